"""The main job as users run it: `python -m sweep -m ...` in a subprocess, checked through MLflow."""

from __future__ import annotations

import json

import pytest
from helpers import make_cfg, run_cli, runs
from omegaconf import OmegaConf

TINY = ("model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320")


def _children(outputs):
    return [r for r in runs(outputs) if r.data.tags.get("sweep.role") == "job"]


def _parents(outputs):
    return [r for r in runs(outputs) if r.data.tags.get("sweep.role") == "parent"]


def test_multirun_logs_nested_runs_resumes_and_reports(tmp_path, assets):
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", *TINY, "sparsity=0,0.3,0.5", sweep_dir=tmp_path / "s1")
    assert p.returncode == 0, p.stderr[-3000:]
    [parent] = _parents(out)
    kids = _children(out)
    assert sorted(r.info.run_name for r in kids) == [
        "yolov5n-l1_unstructured-s0.00", "yolov5n-l1_unstructured-s0.30", "yolov5n-l1_unstructured-s0.50"]
    assert all(r.info.status == "FINISHED" for r in kids)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    assert all(r.data.tags["sweep_id"] == "s1" for r in kids) and parent.data.tags["sweep_id"] == "s1"
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_done"] == "3"
    by_s = {r.data.params["sparsity"]: r.data.metrics for r in kids}
    # the official yolov5n has exactly one zero weight (model.21.conv): dense sparsity 5.4e-7
    assert by_s["0.0"]["sparsity"] < 1e-6 and abs(by_s["0.5"]["sparsity"] - 0.5) < 1e-3
    assert by_s["0.5"]["mAP50-95"] < by_s["0.0"]["mAP50-95"]
    assert "3 done, 0 skipped, 0 failed" in p.stdout
    # the sequential launcher overlaps points: job k's COCO evaluation ran in the worker process, and job k was
    # completed (its run ended, its outcome written) after job k+1's forward pass; the last at the sweep's end
    tl = [json.loads((tmp_path / "s1" / str(k) / "timeline.json").read_text()) for k in range(3)]
    assert all(t["coco_where"] == "worker" for t in tl)
    assert all(tl[k]["completed"] >= tl[k + 1]["forward"][1] for k in range(2))
    assert all({"seconds_coco_wait", "seconds_coco_eval", "seconds_data_wait"} <= set(r.data.metrics) for r in kids)
    # the report was built at the end of the multirun and attached to the parent run
    report_dir = out / "reports" / "s1"
    for name in ("accuracy_vs_sparsity.png", "report.pdf", "results.csv", "results.md"):
        assert (report_dir / name).is_file(), name

    # the same command again: every point is skipped
    p2 = run_cli(out, "-m", *TINY, "sparsity=0,0.3,0.5", sweep_dir=tmp_path / "s2")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "0 done, 3 skipped, 0 failed" in p2.stdout
    assert len(_children(out)) == 3
    # one more point: only that one runs
    p3 = run_cli(out, "-m", *TINY, "sparsity=0,0.3,0.5,0.7", sweep_dir=tmp_path / "s3")
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "1 done, 3 skipped, 0 failed" in p3.stdout
    assert len(_children(out)) == 4


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, assets):
    """A job with bad input fails before its run exists (no FAILED run left behind); the others go on,
    and the parent run ends FAILED so the runs table does not show the sweep as a success."""
    out = tmp_path / "outputs"
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes((assets / "weights" / "yolov5n.pt").read_bytes()[:50_000])
    good = assets / "weights" / "yolov5n.pt"
    p = run_cli(out, "-m", "model=custom", f"model.weights={bad},{good}", "data=coco-val128", "data.limit=4",
                "eval.imgsz=320", sweep_dir=tmp_path / "s")
    assert p.returncode != 0
    assert "1 done, 0 skipped, 1 failed" in p.stdout
    [kid] = _children(out)
    assert kid.info.status == "FINISHED"
    failed_line = next(line for line in p.stdout.splitlines() if " failed " in line and "corrupt.pt" in line)
    assert "truncated or corrupt" in failed_line
    [parent] = _parents(out)
    assert parent.info.status == "FAILED" and parent.data.tags["jobs_failed"] == "1"
    assert "Traceback" not in p.stdout


SLOW = pytest.mark.slow


@pytest.mark.parametrize("args,needle", [
    (("sparsity=abc",), "sparsity='abc'"),
    (("model=yolov9z",), "yolov5n"),   # Hydra lists the available model options
    (("data.path=/no/such/dataset",), "/no/such/dataset"),
    pytest.param(("sparsity=1.0",), "sparsity=1.0", marks=SLOW),
    pytest.param(("sparsity=-0.1",), "sparsity=-0.1", marks=SLOW),
    pytest.param(("eval.imgsz=100",), "eval.imgsz=100", marks=SLOW),
    pytest.param(("model=custom", "model.weights=/no/such/file.pt"), "/no/such/file.pt", marks=SLOW),
])
def test_bad_input_gives_one_clear_message_and_no_run(tmp_path, assets, args, needle):
    out = tmp_path / "outputs"
    p = run_cli(out, "model=yolov5n", "data=coco-val128", *args)
    assert p.returncode != 0
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert runs(out) == []


def test_read_outcomes_reports_a_job_that_started_without_an_outcome_as_lost(tmp_path):
    import json

    from sweep.track.callbacks import LOST, read_outcomes, summary_table

    sweep = tmp_path / "sweep"
    cfg = make_cfg(tmp_path, "model=yolov5n", "sparsity=0.3")
    for job in ("0", "1", "10", "2"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    for job in ("0", "2", "10"):
        (sweep / job / "outcome.json").write_text(json.dumps(
            {"status": "done", "name": f"n{job}", "run_id": "r", "reason": "", "metrics": {"mAP50-95": 0.5, "AR100": 0.6}}))
    (sweep / ".submitit").mkdir()  # the submitit launcher's folder is no job
    outcomes = read_outcomes(sweep)
    assert [o.job for o in outcomes] == ["0", "1", "2", "10"]
    assert (outcomes[1].job, outcomes[1].status, outcomes[1].name, outcomes[1].reason) == (
        "1", "failed", "yolov5n-l1_unstructured-s0.30", LOST)
    assert summary_table(outcomes).splitlines()[-1] == "sweep: 3 done, 0 skipped, 1 failed"


def test_two_sweeps_launched_in_the_same_second_never_share_a_sweep(tmp_path, assets):
    """Regression: the sweep id and folder came from the launch second, so two launches collided (job folders
    overwritten, one parent run with the other's children). Now each launch gets its own id."""
    import os
    import subprocess
    import sys

    from helpers import FAST, REPO

    out = tmp_path / "outputs"
    env = os.environ.copy()
    cmd = [sys.executable, "-m", "sweep", "-m", *TINY[:2], "data.limit=2", "eval.imgsz=320", "report=false",
           f"paths.outputs={out}", f"paths.preprocessed={out}/pre", *FAST]
    procs = [subprocess.Popen([*cmd, f"sparsity={s}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in ("0.3,0.5", "0.6,0.7")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    sweeps = sorted((out / "multirun").iterdir())
    assert len(sweeps) == 2 and all(sorted(p.name for p in d.glob("?")) == ["0", "1"] for d in sweeps)
    parents = _parents(out)
    assert len(parents) == 2 and len({p.data.tags["sweep_id"] for p in parents}) == 2
    for parent in parents:
        kids = [r for r in _children(out) if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(kids) == 2 and parent.data.tags["jobs_done"] == "2"
        assert {r.data.tags["sweep_id"] for r in kids} == {parent.data.tags["sweep_id"]}


def test_two_overlapping_sweeps_at_once_evaluate_each_point_once(tmp_path, assets):
    """Regression: the resume check was not atomic, so two sweeps launched together with the same points
    both evaluated them. Now the first run of a config hash holds the point; the other sweep waits for it
    and reuses its result (its summary says so)."""
    import os
    import subprocess
    import sys

    from helpers import FAST, REPO

    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "sweep", "-m", *TINY[:2], "data.limit=16", "eval.imgsz=320", "report=false",
           "sparsity=0,0.3", f"paths.outputs={out}", f"paths.preprocessed={out}/pre", *FAST]
    procs = [subprocess.Popen([*cmd, f"hydra.sweep.dir={tmp_path / name}"], cwd=REPO, env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    evaluated = sorted(f.parent.name for name in ("a", "b") for f in (tmp_path / name).glob("*/metrics.json"))
    assert evaluated == ["0", "1"], "each point must be evaluated by exactly one of the two sweeps"
    kids = _children(out)
    assert sorted(r.info.run_name for r in kids) == ["yolov5n-l1_unstructured-s0.00", "yolov5n-l1_unstructured-s0.30"]
    assert all(r.info.status == "FINISHED" for r in kids)  # the waiting runs were deleted, none left RUNNING
    import re

    summaries = "".join(stdout for stdout, _ in outputs)
    counts = [tuple(map(int, m)) for m in re.findall(r"sweep: (\d+) done, (\d+) skipped, (\d+) failed", summaries)]
    assert len(counts) == 2 and [sum(c) for c in zip(*counts)] == [2, 2, 0], counts
    assert "evaluated once for both: by concurrent" in summaries or "same config as run" in summaries


def test_an_override_hydra_cannot_parse_is_named(tmp_path):
    """Hydra's grammar error does not say which override is wrong; ours does, as an input error (exit 2)."""
    p = run_cli(tmp_path / "outputs", "-m", "model=yolov5n", "sparsity=0.3,0.5,")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: cannot parse the override 'sparsity=0.3,0.5,'")
    assert runs(tmp_path / "outputs") == []


def test_a_config_error_in_any_job_stops_the_sweep_before_its_parent_run(tmp_path):
    """Every job's config is checked at sweep start: one message per distinct error (naming the jobs it
    hits), exit 2, no parent run, no store, no job folder."""
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "model=yolov5n", "data=coco-val128", "prune.method=magic", "sparsity=0.3,0.5",
                sweep_dir=tmp_path / "s")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: prune.method='magic' is unknown: allowed are channel, global_l1, l1_unstructured, "
                      "lamp, ln_structured, random, sensitivity (jobs 0, 1)"]
    assert not (out / "mlflow.db").exists() and not (tmp_path / "s").exists()
    p2 = run_cli(out, "-m", "model=yolov5n", "data=coco-val128", "sparsity=0,0.5,1.0", sweep_dir=tmp_path / "s")
    assert p2.returncode == 2 and p2.stderr.count("error: sparsity=1.0 is out of range") == 1
    assert not (out / "mlflow.db").exists()


def test_an_offline_sweep_names_its_missing_inputs_once_before_any_run(tmp_path):
    """Regression: every job of an offline multirun failed with the same download error (each ~450
    characters), after the parent run was created. Now the inputs are checked once per distinct model
    and dataset at sweep start: one message listing every missing file, exit 2, no run, no job folder."""
    empty = tmp_path / "cache"
    empty.mkdir()
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "model=yolov5s,yolov5m", "data=coco-val128", "sparsity=0,0.3", "report=false",
                sweep_dir=tmp_path / "s", env={"SWEEP_CACHE": str(empty)})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, errors  # one per model, each naming the weights file and the dataset
    for model, jobs in (("yolov5s", "(jobs 0, 1)"), ("yolov5m", "(jobs 2, 3)")):
        [line] = [e for e in errors if f"{model}.pt" in e]
        assert "Without network access" in line and "coco-val128" in line and line.endswith(jobs)
    assert not (out / "mlflow.db").exists() and not (tmp_path / "s").exists()
