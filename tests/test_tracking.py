"""Closing runs orphaned by dead processes (sweep.track.tracker), against a real SQLite MLflow store."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from sweep.track.tracker import Tracker, process_alive


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_process_alive_tells_a_live_process_from_a_finished_one():
    assert process_alive(os.getpid())
    assert not process_alive(_dead_pid())


def test_close_orphans_fails_only_runs_of_dead_processes_of_this_host(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", (tmp_path / "art").as_uri())
    host, dead, me = platform.node(), str(_dead_pid()), str(os.getpid())
    ids = {
        "dead": tracker.start_run("dead", {"host": host, "pid": dead, "sweep_id": "a"}),
        "dead_other_sweep": tracker.start_run("dead2", {"host": host, "pid": dead, "sweep_id": "b"}),
        "alive": tracker.start_run("alive", {"host": host, "pid": me, "sweep_id": "a"}),
        "other_host": tracker.start_run("far", {"host": host + "-elsewhere", "pid": dead, "sweep_id": "a"}),
        "no_pid": tracker.start_run("old", {"host": host, "sweep_id": "a"}),
        "finished": tracker.start_run("done", {"host": host, "pid": dead, "sweep_id": "a"}),
    }
    tracker.end(ids["finished"], "FINISHED")

    def status(key: str) -> str:
        return tracker.client.get_run(ids[key]).info.status

    assert tracker.close_orphans("tags.sweep_id = 'a'") == [ids["dead"]]
    assert status("dead") == "FAILED"
    assert tracker.client.get_run(ids["dead"]).data.tags["error"].startswith(f"orphaned: process {dead} on {host}")
    assert [status(k) for k in ("dead_other_sweep", "alive", "other_host", "no_pid", "finished")] == \
        ["RUNNING", "RUNNING", "RUNNING", "RUNNING", "FINISHED"]

    # without a filter: every sweep; this process's own runs only once it says it has ended
    assert tracker.close_orphans() == [ids["dead_other_sweep"]]
    assert tracker.close_orphans(this_process_ended=True) == [ids["alive"]]
    assert [status(k) for k in ("other_host", "no_pid")] == ["RUNNING", "RUNNING"]


def test_processes_creating_one_new_sqlite_store_at_once_all_succeed(tmp_path):
    # MLflow creates and migrates the schema on first use; unserialised, concurrent first uses
    # fail with "duplicate column name" (seen with 3 processes before the lock existed)
    code = ("import sys; from sweep.track.tracker import Tracker; "
            "t = Tracker(sys.argv[1], 'exp'); print(t.start_run('r', {}))")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in results]
    tracker = Tracker(uri, "exp")
    assert len(tracker.search("")) == 3


def test_the_experiment_opens_on_its_runs_table_in_mlflow_3(tmp_path):
    """MLflow 3's UI opens an experiment without a kind on the GenAI overview; ours is a model-training one,
    also when the experiment existed before (an older store)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "fresh")
    kind = MlflowClient(uri).get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"
    old = MlflowClient(uri).create_experiment("older")
    Tracker(uri, "older")
    assert MlflowClient(uri).get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_credentials_in_an_http_tracking_uri_move_to_mlflows_basic_auth_variables(monkeypatch):
    from sweep.process import credentials_to_environment

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    argv = ["-m", "model=yolov5n", "mlflow.tracking_uri=https://alice:p%40ss@mlflow.example:5000/x", "sparsity=0.3"]
    assert credentials_to_environment(argv) == ["-m", "model=yolov5n", "mlflow.tracking_uri=https://mlflow.example:5000/x",
                                                "sparsity=0.3"]
    import os

    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p@ss")
    # a database URI needs its password in the URI: kept (the tool redacts it wherever it writes or logs it)
    db = ["mlflow.tracking_uri=postgresql://bob:pw@db/mlflow"]
    assert credentials_to_environment(db) == db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://carol:pw2@host:5000")
    credentials_to_environment([])
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://host:5000" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw2"


def test_a_run_id_containing_503_is_not_taken_for_a_server_outage():
    """Regression: 'No tag with name: error in run with id a3780e089c70453bae9c8cc335022609' was retried for
    the whole window as a transient failure: the run id contains '503'. Status codes count as words only."""
    from mlflow.exceptions import MlflowException

    from sweep.track.tracker import _is_transient

    assert not _is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: No tag with name: error in run with id "
                                             "a3780e089c70453bae9c8cc335022609"))
    assert _is_transient(MlflowException("API request failed with error code 503 != 200"))
    assert _is_transient(ConnectionError("Connection refused"))
