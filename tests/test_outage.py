"""A tracking-server outage loses nothing: real ``mlflow server`` processes killed and restarted mid-sweep.

Each job keeps evaluating while the store is away; its complete record (params, metrics, tags,
artifacts, status) waits in ``<outputs>/spool/`` and is uploaded when the store answers again — at
the end of the sweep, at the next start, or with ``python -m sweep.track upload``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import FAST, REPO, run_cli
from mlflow_server import MlflowServer, free_port

ARGS = ("model=yolov5n", "data=coco-val128", "data.limit=24", "eval.imgsz=320", "report=false")


def _names(*sparsities: float) -> list[str]:
    return [f"yolov5n-l1_unstructured-s{s:.2f}" for s in sparsities]


def _server_runs(server: MlflowServer) -> list:
    client = server.client()
    exp = client.get_experiment_by_name("yolov5-sparsity")
    return [] if exp is None else list(client.search_runs([exp.experiment_id], max_results=1000))


def _popen(outputs: Path, *args: str, sweep_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sweep", *args, f"paths.outputs={outputs}", f"paths.preprocessed={outputs}/pre",
           *FAST, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_evaluating(server: MlflowServer, proc: subprocess.Popen, name: str, timeout: float = 300) -> str:
    """The run id of job ``name`` once it is RUNNING on the server with its params (inside the evaluation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before job {name} started: {proc.stderr.read()[-3000:]}")
        try:
            found = [r for r in _server_runs(server) if r.info.run_name == name]
        except Exception:  # noqa: BLE001 - the experiment may not exist yet
            found = []
        if found and found[0].data.params:
            assert found[0].info.status == "RUNNING", "the job ended before the server could be dropped"
            return found[0].info.run_id
        time.sleep(0.05)
    pytest.fail(f"job {name} did not start within {timeout:.0f}s")


def _communicate(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_outage_longer_than_the_retry_window_spools_every_record_and_the_upload_completes_the_sweep(
        tmp_path, assets):
    server = MlflowServer(tmp_path / "server").start()
    out, sweep_dir = tmp_path / "outputs", tmp_path / "s1"
    args = ("-m", *ARGS, "sparsity=0,0.3", f"mlflow.tracking_uri={server.uri}", "mlflow.retry_window=2")
    try:
        proc = _popen(out, *args, sweep_dir=sweep_dir)
        first_run = _wait_until_evaluating(server, proc, _names(0)[0])
        server.kill()
        stdout, stderr = _communicate(proc)

        # both jobs evaluated; the sweep says what waits and how to upload it, with its own exit status
        assert proc.returncode == 3, stderr[-3000:]
        assert "2 done, 0 skipped, 0 failed (2 with its MLflow record pending upload)" in stdout, stdout[-2000:]
        assert "3 run record(s) pending upload" in stderr and "python -m sweep.track upload" in stderr, stderr[-2000:]
        assert "Traceback" not in stdout + stderr
        kept = {j: json.loads((sweep_dir / j / "metrics.json").read_text()) for j in ("0", "1")}
        spooled = [json.loads(p.read_text()) for p in sorted((out / "spool").glob("*.json"))]
        assert sorted(r["role"] for r in spooled) == ["job", "job", "parent"]
        # a record names its store by a hash (a URI may hold a password) and shows only the redacted URI
        from sweep.track.spool import store_key

        assert {r["store"] for r in spooled} == {store_key(server.uri, "yolov5-sparsity")}
        assert {r["store_display"] for r in spooled} == {server.uri}

        # the explicit upload while the store is still away: nothing lost, still pending
        up = subprocess.run([sys.executable, "-m", "sweep.track", "upload", "--outputs", str(out),
                             "--tracking-uri", server.uri, "--wait", "0"], cwd=REPO, capture_output=True, text=True)
        assert up.returncode == 3 and "unreachable" in up.stderr, up.stdout + up.stderr
        assert len(list((out / "spool").glob("*.json"))) == 3

        server.start()  # back, same store and port
        up = subprocess.run([sys.executable, "-m", "sweep.track", "upload", "--outputs", str(out),
                             "--tracking-uri", server.uri], cwd=REPO, capture_output=True, text=True)
        assert up.returncode == 0 and "uploaded 3 run record(s)" in up.stdout, up.stdout + up.stderr[-3000:]
        assert not list((out / "spool").glob("*.json"))

        runs = _server_runs(server)
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        kids = [r for r in runs if r.data.tags.get("sweep.role") == "job"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.tags["jobs_done"] == "2" and parents[0].data.tags["jobs_pending"] == "2"
        assert sorted(r.info.run_name for r in kids) == _names(0, 0.3)
        assert all(r.info.status == "FINISHED" for r in kids)
        assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in kids)
        by_name = {r.info.run_name: r for r in kids}
        assert by_name[_names(0)[0]].info.run_id == first_run  # the run created before the outage, completed
        for job, name in (("0", _names(0)[0]), ("1", _names(0.3)[0])):
            run = by_name[name]
            assert run.data.metrics["mAP50-95"] == pytest.approx(kept[job]["mAP50-95"])
            assert run.data.params["sparsity"] in ("0.0", "0.3")
            assert "metrics.json" in {a.path for a in server.client().list_artifacts(run.info.run_id)}

        # and the same sweep again finds both points done
        p = run_cli(out, *args, sweep_dir=tmp_path / "s2")
        assert p.returncode == 0 and "0 done, 2 skipped, 0 failed" in p.stdout, p.stderr[-3000:]
    finally:
        server.stop()


@pytest.mark.slow
def test_an_outage_shorter_than_the_retry_window_is_ridden_out_without_spooling(tmp_path, assets):
    server = MlflowServer(tmp_path / "server").start()
    out, sweep_dir = tmp_path / "outputs", tmp_path / "s1"
    try:
        proc = _popen(out, "-m", *ARGS, "sparsity=0,0.3", f"mlflow.tracking_uri={server.uri}",
                      "mlflow.retry_window=300", sweep_dir=sweep_dir)
        _wait_until_evaluating(server, proc, _names(0)[0])
        server.kill()
        back = threading.Timer(4.0, server.start)  # a restart: the server is away for several seconds
        back.start()
        stdout, stderr = _communicate(proc)
        back.join()
        assert proc.returncode == 0, stderr[-3000:]
        assert "2 done, 0 skipped, 0 failed" in stdout and "pending" not in stdout
        assert not list((out / "spool").glob("*.json"))
        kids = [r for r in _server_runs(server) if r.data.tags.get("sweep.role") == "job"]
        assert sorted(r.info.run_name for r in kids if r.info.status == "FINISHED") == _names(0, 0.3)
    finally:
        server.stop()


def test_a_single_run_against_a_dead_server_keeps_its_record_and_the_next_start_uploads_it(tmp_path, assets):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "outputs"
    args = (*ARGS, "sparsity=0.3", f"mlflow.tracking_uri={uri}", "mlflow.retry_window=1")
    p = run_cli(out, *args)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "1 run record(s) pending upload" in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert len(list((out / "spool").glob("*.json"))) == 1

    server = MlflowServer(tmp_path / "server", port=port).start()
    try:
        p = run_cli(out, *args)  # the next start uploads the record, then resume finds the point done
        assert p.returncode == 0, p.stderr[-3000:]
        assert "skip yolov5n-l1_unstructured-s0.30" in p.stdout + p.stderr
        assert not list((out / "spool").glob("*.json"))
        kids = [r for r in _server_runs(server) if r.data.tags.get("sweep.role") == "job"]
        assert [r.info.status for r in kids] == ["FINISHED"] and kids[0].data.metrics["mAP50-95"] > 0
    finally:
        server.stop()
