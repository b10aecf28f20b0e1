"""Scale-out: Hydra launcher plugins (joblib, submitit) and a real MLflow server, end to end.

Every sweep here is the real CLI in a subprocess on a tiny subset of the real assets; the runs
are checked through MLflow (the SQLite store, or the server's REST API). No mocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CONF, FAST, REPO, run_cli, runs
from mlflow_server import MlflowServer, free_port, mlflow_server  # noqa: F401 - fixture

TINY = ("model=yolov5n", "data=coco-val128", "data.limit=4", "eval.imgsz=320", "report=false")


# -- GPU claims (simulated device lists, real processes) ----------------------------------------------
def _claim_in_child(folder: str, ids: list[str], ready) -> None:
    from sweep.evaluate.device import claim_gpu

    claim = claim_gpu(ids, Path(folder))
    ready.put((claim.index, claim.shared))
    time.sleep(60)  # holds the claim until the test ends the process


def _claims(tmp_path, ids, processes):
    """Start ``processes`` real processes that each claim one of ``ids`` and keep it; returns their claims and
    the processes (end them with :func:`_end`)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children only lock files: no torch work after the fork
    ready = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(str(tmp_path), ids, ready)) for _ in range(processes)]
    got = []
    for p in procs:  # one after another: the order of claims is then known
        p.start()
        got.append(ready.get(timeout=60))
    return got, procs


def _end(procs) -> None:
    for p in procs:
        p.terminate()
        p.join(30)


def test_each_worker_process_claims_its_own_gpu_and_shares_only_when_there_are_more_workers(tmp_path):
    got, procs = _claims(tmp_path, ["gpu-a", "gpu-b"], 3)
    try:
        assert got[:2] == [(0, False), (1, False)]  # two workers, two GPUs: never the same one
        assert got[2] == (0, True)                  # a third shares the least-claimed GPU, flagged
    finally:
        _end(procs)


def test_a_gpu_claim_ends_with_its_process_also_when_killed(tmp_path):
    from sweep.evaluate.device import claim_gpu

    got, procs = _claims(tmp_path, ["gpu-a", "gpu-b"], 2)
    try:
        assert got == [(0, False), (1, False)]
        procs[0].kill()  # SIGKILL: no cleanup code runs, the OS drops its lock
        procs[0].join(30)
        mine = claim_gpu(["gpu-a", "gpu-b"], tmp_path)
        assert (mine.index, mine.shared) == (0, False)
        mine.release()
    finally:
        _end(procs)


def test_a_process_keeps_its_claim_for_its_lifetime(tmp_path):
    """The sequential launcher's process (or a joblib worker) claims once: every later job uses that GPU."""
    from sweep.memo import ProcessMemo
    import sweep.evaluate.device as device

    memo = ProcessMemo()
    first = device.claim_gpu(["gpu-a", "gpu-b"], tmp_path)
    memo.gpu = first
    assert memo.gpu_claim() is first and memo.gpu_claim().index == 0
    other = device.claim_gpu(["gpu-a", "gpu-b"], tmp_path)  # another process's claim meanwhile
    assert (other.index, other.shared) == (1, False)
    first.release()
    other.release()


def test_auto_device_on_a_cpu_only_machine_is_the_cpu_without_a_claim():
    import torch

    from sweep.evaluate.device import resolve_device

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CPU fallback is not what runs here")
    assert resolve_device("auto", None) == (torch.device("cpu"), False)


def _hydra_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from sweep.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config_makes_a_valid_one_gpu_per_job_sbatch_array(tmp_path):
    """conf/hydra/launcher/slurm.yaml extends submitit_slurm; its keys are ones sbatch accepts."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from submitit.slurm import slurm

    cfg = _hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=a100", "hydra.launcher.array_parallelism=3",
                     f"hydra.sweep.dir={tmp_path}")
    lc = cfg.hydra.launcher
    assert lc.gpus_per_node == 1 and lc.tasks_per_node == 1 and lc.timeout_min > 0
    launcher = instantiate(lc)
    assert type(launcher).__name__ == "SlurmLauncher"  # (Hydra's plugin discovery imports the module itself)
    # What the plugin hands submitit, turned into the sbatch script submitit writes for a 5-job array.
    params = {k: v for k, v in launcher.params.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    names = slurm.SlurmExecutor._equivalence_dict()
    sbatch_kwargs = {names.get(k, k): v for k, v in params.items()}
    sbatch_kwargs["mem"] = slurm._convert_mem(sbatch_kwargs["mem"])
    script = slurm._make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path, map_count=5,
                                       **sbatch_kwargs)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=a100", "#SBATCH --array=0-4%3",
                 f"#SBATCH --time={lc.timeout_min}", "#SBATCH --ntasks-per-node=1"):
        assert line in script, script
    assert OmegaConf.select(cfg, "hydra.launcher._target_").endswith("SlurmLauncher")


def test_parallel_launcher_config_is_joblib_with_a_bounded_worker_count():
    cfg = _hydra_cfg("hydra/launcher=parallel")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs >= 1


# -- helpers for the end-to-end sweeps ---------------------------------------------------------------
def _roles(all_runs: list) -> tuple[list, list]:
    parents = [r for r in all_runs if r.data.tags.get("sweep.role") == "parent"]
    kids = [r for r in all_runs if r.data.tags.get("sweep.role") == "job"]
    return parents, kids


def _outcomes(sweep_dir: Path) -> dict[str, dict]:
    return {f.parent.name: json.loads(f.read_text()) for f in sweep_dir.glob("*/outcome.json")}


def assert_each_job_logged_once(all_runs: list, sweep_dir: Path, names: list[str]) -> tuple:
    """One FINISHED parent; exactly one FINISHED child per job, distinct configs, all under that parent,
    and each job's outcome.json names its own run."""
    parents, kids = _roles(all_runs)
    [parent] = parents
    assert parent.data.tags["sweep_id"] == sweep_dir.name
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_done"] == str(len(names))
    assert sorted(r.info.run_name for r in kids) == sorted(names)
    assert all(r.info.status == "FINISHED" for r in kids)
    assert len({r.data.tags["config_hash"] for r in kids}) == len(names)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    assert all(r.data.tags["sweep_id"] == sweep_dir.name for r in kids)
    outcomes = _outcomes(sweep_dir)
    assert sorted(outcomes) == [str(i) for i in range(len(names))]
    assert {o["status"] for o in outcomes.values()} == {"done"}
    assert sorted(o["run_id"] for o in outcomes.values()) == sorted(r.info.run_id for r in kids)
    for job in outcomes:
        assert (sweep_dir / job / "metrics.json").is_file()
    return parent, kids


def _names(*sparsities: float) -> list[str]:
    return [f"yolov5n-l1_unstructured-s{s:.2f}" for s in sparsities]


# -- launchers ---------------------------------------------------------------------------------------
def test_joblib_launcher_runs_jobs_in_parallel_processes_and_logs_each_once(tmp_path, assets):
    out, sweep_dir = tmp_path / "outputs", tmp_path / "s-joblib"
    t0 = time.monotonic()
    p = run_cli(out, "-m", *TINY, "sparsity=0,0.3,0.5", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                sweep_dir=sweep_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in p.stdout + p.stderr
    assert "3 done, 0 skipped, 0 failed" in p.stdout
    assert_each_job_logged_once(runs(out), sweep_dir, _names(0, 0.3, 0.5))
    print(f"joblib sweep: {time.monotonic() - t0:.1f}s")
    # each worker keeps its per-process memo across its jobs (it used to get a fresh pickled copy per job):
    # 3 jobs on 2 workers read the labels at most twice
    logs = [f.read_text() for f in sweep_dir.glob("*/*.log")]
    assert len(logs) == 3, sorted(str(f) for f in sweep_dir.rglob("*.log"))
    assert sum("reading the labels of 4 images of coco-val128" in text for text in logs) <= 2, logs


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_as_its_own_process_and_logs_each_once(tmp_path, assets):
    out, sweep_dir = tmp_path / "outputs", tmp_path / "s-submitit"
    p = run_cli(out, "-m", *TINY, "sparsity=0,0.3", "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=10", sweep_dir=sweep_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in p.stdout + p.stderr
    assert "2 done, 0 skipped, 0 failed" in p.stdout
    assert_each_job_logged_once(runs(out), sweep_dir, _names(0, 0.3))
    # each job ran in its own submitit job folder (a separate process, its result pickled back)
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2


# -- a real MLflow server ----------------------------------------------------------------------------
def _server_runs(server: MlflowServer, experiment: str = "yolov5-sparsity") -> list:
    client = server.client()
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id], max_results=1000))


def test_parallel_sweep_against_a_real_mlflow_server(tmp_path, assets, mlflow_server):
    server = mlflow_server
    out, sweep_dir = tmp_path / "outputs", tmp_path / "s-server"
    p = run_cli(out, "-m", *TINY, "sparsity=0,0.3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                f"mlflow.tracking_uri={server.uri}", sweep_dir=sweep_dir)
    assert p.returncode == 0, p.stderr[-3000:] + server.log_tail()
    assert "2 done, 0 skipped, 0 failed" in p.stdout
    _, kids = assert_each_job_logged_once(_server_runs(server), sweep_dir, _names(0, 0.3))
    # everything went through the server: no local store, artifacts in the server's destination
    assert not (out / "mlflow.db").exists()
    client = server.client()
    for kid in kids:
        assert kid.info.artifact_uri.startswith("mlflow-artifacts:")
        assert "metrics.json" in {a.path for a in client.list_artifacts(kid.info.run_id)}
        local = json.loads(Path(client.download_artifacts(kid.info.run_id, "metrics.json", str(tmp_path))).read_text())
        assert local["mAP50-95"] == pytest.approx(kid.data.metrics["mAP50-95"])
    assert list(server.artifacts.rglob("metrics.json"))


def test_unreachable_tracking_server_fails_once_before_any_evaluation(tmp_path, assets):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out, sweep_dir = tmp_path / "outputs", tmp_path / "s-down"
    t0 = time.monotonic()
    p = run_cli(out, "-m", *TINY, "sparsity=0,0.3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                f"mlflow.tracking_uri={uri}", sweep_dir=sweep_dir)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert uri in p.stderr and "unreachable" in p.stderr
    assert p.stderr.count("error:") == 1, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert "Joblib.Parallel" not in p.stdout + p.stderr          # no job was launched
    assert not list(sweep_dir.glob("*/metrics.json")) and not list(sweep_dir.glob("*/outcome.json"))
    assert elapsed < 60, f"took {elapsed:.0f}s to report an unreachable server"


def _popen_cli(outputs: Path, *args: str, sweep_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sweep", *args, f"paths.outputs={outputs}", f"paths.preprocessed={outputs}/pre",
           *FAST, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- a worker killed from outside (kill -9, the OOM killer) ---------------------------------------------
def _first_running_job(out: Path, sweep_dir: Path, proc: subprocess.Popen, timeout: float = 300,
                       name: str | None = None) -> object:
    deadline = time.monotonic() + timeout
    named = f" and attributes.run_name = '{name}'" if name else ""
    while time.monotonic() < deadline and proc.poll() is None:
        found = []
        if list(sweep_dir.glob("*/.hydra")):  # the jobs started: the store exists (not created under us)
            found = runs(out, filter_string=f"attributes.status = 'RUNNING' and tags.`sweep.role` = 'job'{named}")
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no job run became RUNNING (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


def test_a_killed_worker_aborts_the_sweep_with_a_summary_and_no_run_left_running(tmp_path, assets):
    import os
    import signal

    from sweep.track.callbacks import LOST

    out = tmp_path / "outputs"
    args = ("-m", "model=yolov5n", "data=coco-val128", "data.limit=32", "report=false", "sparsity=0,0.3",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    extra = [f"paths.outputs={out}", f"paths.preprocessed={out}/pre", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "sweep", *args, *extra, f"hydra.sweep.dir={tmp_path / 's1'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _first_running_job(out, tmp_path / "s1", proc)
        os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)  # the job's own process: a joblib worker
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert "sweep aborted" in stderr, stdout[-2000:] + stderr[-3000:]
    assert "TerminatedWorkerError" in stderr or "terminated abruptly" in stderr
    table = (tmp_path / "s1" / "summary.txt").read_text()
    assert LOST in table and table.strip() in stdout  # the summary table still came
    after = {r.info.run_id: r for r in runs(out)}
    assert not [r.info.run_name for r in after.values() if r.info.status == "RUNNING"]
    killed = after[victim.info.run_id]
    assert killed.info.status == "FAILED" and killed.data.tags["error"].startswith("orphaned: process")
    [parent] = [r for r in after.values() if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "FAILED" and parent.data.tags["error"].startswith("aborted")

    # running the command again finishes the sweep: each point ends with exactly one FINISHED run
    p = run_cli(out, *args, sweep_dir=tmp_path / "s2")
    assert p.returncode == 0, p.stderr[-3000:]
    finished = [r for r in runs(out, filter_string="attributes.status = 'FINISHED' and tags.`sweep.role` = 'job'")]
    assert sorted(r.info.run_name for r in finished) == _names(0, 0.3)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_ends_the_sweep_like_ctrl_c(tmp_path, assets, sig):
    """What Slurm, Docker and Kubernetes send first: runs end KILLED (none left RUNNING), the summary
    still comes, one line instead of a traceback, exit status 130."""
    import signal

    out = tmp_path / "outputs"
    args = ("-m", "model=yolov5n", "data=coco-val128", "data.limit=32", "report=false", "sparsity=0,0.3")
    extra = [f"paths.outputs={out}", f"paths.preprocessed={out}/pre", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "sweep", *args, *extra, f"hydra.sweep.dir={tmp_path / 's1'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _first_running_job(out, tmp_path / "s1", proc, name="yolov5n-l1_unstructured-s0.00")
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted (" in stderr
    assert "sweep:" in stdout and "failed" in (tmp_path / "s1" / "summary.txt").read_text()
    after = {r.info.run_id: r for r in runs(out)}
    assert not [r.info.run_name for r in after.values() if r.info.status == "RUNNING"]
    assert after[victim.info.run_id].info.status == "KILLED"
    [parent] = [r for r in after.values() if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "KILLED"


def test_rerunning_an_interrupted_sweep_continues_it_under_the_same_parent_run(tmp_path, assets):
    """Regression: every launch had its own parent run, so a grid interrupted and resumed was scattered over
    several parents (and reports). The same command again now continues the interrupted sweep's parent."""
    import signal

    from sweep.report.query import select_runs

    out = tmp_path / "outputs"
    args = ("-m", "model=yolov5n", "data=coco-val128", "data.limit=16", "eval.imgsz=320", "report=false",
            "sparsity=0,0.3")
    extra = [f"paths.outputs={out}", f"paths.preprocessed={out}/pre", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "sweep", *args, *extra, f"hydra.sweep.dir={tmp_path / 's1'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # job 1 runs (job 0's completion may still wait for its COCO numbers: the interruption completes it)
        _first_running_job(out, tmp_path / "s1", proc, name="yolov5n-l1_unstructured-s0.30")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    [parent] = [r for r in runs(out) if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "KILLED"

    p = run_cli(out, *args, sweep_dir=tmp_path / "s2")  # the same command, a new launch
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 done, 1 skipped, 0 failed" in p.stdout
    assert "continues the interrupted sweep s1" in p.stdout + p.stderr
    parents = [r for r in runs(out) if r.data.tags.get("sweep.role") == "parent"]
    assert [r.info.run_id for r in parents] == [parent.info.run_id] and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["sweep.continued.s2"] == "true" and "error" not in parents[0].data.tags
    finished = [r for r in runs(out, filter_string="attributes.status = 'FINISHED' and tags.`sweep.role` = 'job'")]
    assert sorted(r.info.run_name for r in finished) == _names(0, 0.3)
    assert {r.data.tags["mlflow.parentRunId"] for r in finished} == {parent.info.run_id}
    # the report of either launch id is the whole sweep
    for sweep in ("s1", "s2"):
        sel = select_runs(f"sqlite:///{out / 'mlflow.db'}", "yolov5-sparsity", sweep=sweep)
        assert sel.parent.info.run_id == parent.info.run_id
        assert sorted(r.info.run_name for r in sel.runs if r.info.status == "FINISHED") == _names(0, 0.3)

    # a different command is a different sweep
    p = run_cli(out, *args[:-1], "sparsity=0.3", sweep_dir=tmp_path / "s3")
    assert p.returncode == 0 and len([r for r in runs(out) if r.data.tags.get("sweep.role") == "parent"]) == 2


def test_credentials_in_the_tracking_uri_never_reach_runs_files_or_the_console(tmp_path, assets, mlflow_server):
    """Regression: user:password in mlflow.tracking_uri appeared in the run's params, its overrides tag,
    config.yaml, results.csv and console lines. The server (no auth) ignores the credentials."""
    secret = "s3cr3t-Pa55"
    uri = mlflow_server.uri.replace("http://", f"http://alice:{secret}@")
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", *TINY[:-1], "report=true", "sparsity=0.3", f"mlflow.tracking_uri={uri}",
                sweep_dir=tmp_path / "s")
    assert p.returncode == 0, p.stderr[-3000:]
    assert secret not in p.stdout + p.stderr
    client = mlflow_server.client()
    found = _server_runs(mlflow_server)
    assert len(found) == 2  # the parent and the job
    for run in found:
        assert secret not in json.dumps({**run.data.params, **run.data.tags})
        for art in client.list_artifacts(run.info.run_id):
            if not art.is_dir:
                local = client.download_artifacts(run.info.run_id, art.path, str(tmp_path / "dl"))
                assert secret not in Path(local).read_bytes().decode(errors="replace"), art.path
    written = [f for f in [*out.rglob("*"), *(tmp_path / "s").rglob("*")] if f.is_file() and f.suffix != ".npy"]
    assert written and not [f for f in written if secret.encode() in f.read_bytes()]
