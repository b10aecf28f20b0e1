"""Report stage: synthetic but realistic runs in a temporary sqlite MLflow store (real client, no mocks)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from sweep.report import REPORT_FILES, ReportError, build_report
from sweep.report import figures as F
from sweep.report import query as Q
from sweep.report import tables as T
from sweep.report.__main__ import main

pypdf = pytest.importorskip("pypdf")
mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param  # noqa: E402

from sweep import contract  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXP = "yolov5-sparsity"

# dense COCO numbers close to the official yolov5 v7.0 ones (640 px); a CPU-ish speed profile
DENSE = {
    "yolov5n": dict(map=0.280, map50=0.457, ar100=0.409, ms=6.2, gflops=4.5, params=1_867_405, mb=3.9),
    "yolov5s": dict(map=0.374, map50=0.568, ar100=0.517, ms=11.8, gflops=16.5, params=7_225_885, mb=14.4),
}
# how fast accuracy falls with sparsity: retention = 1 - k * s ** p
DECAY = {"l1_unstructured": (0.9, 2.5), "random_unstructured": (1.6, 1.4), "bn_scale_channel": (1.2, 1.6)}


def job_metrics(model: str, method: str, s: float, imgsz: int = 640, half: bool = False,
                recover: str = "none", layer: int | None = None) -> dict[str, float]:
    d = DENSE.get(model, DENSE["yolov5s"])  # a custom checkpoint: yolov5s-like numbers
    k, p = DECAY[method]
    if layer is not None:  # one layer pruned: small, layer-dependent drop
        k = k * (0.05 + 0.02 * (layer % 5))
    if recover == "bn":
        k *= 0.6
    r = max(0.02, 1 - k * s ** p) * (0.93 if imgsz == 320 else 1.0) * (0.995 if half else 1.0)
    m = {"mAP50-95": d["map"] * r, "mAP50": d["map50"] * r ** 0.8, "mAP75": d["map"] * 1.08 * r,
         "mAP_small": d["map"] * 0.45 * r, "mAP_medium": d["map"] * 1.1 * r, "mAP_large": d["map"] * 1.3 * r,
         "AR1": d["ar100"] * 0.55 * r, "AR10": d["ar100"] * 0.92 * r, "AR100": d["ar100"] * r ** 0.7,
         "AR_small": d["ar100"] * 0.5 * r, "AR_medium": d["ar100"] * 1.1 * r, "AR_large": d["ar100"] * 1.3 * r}
    channel = method == "bn_scale_channel"
    keep = 1 - s if channel else 1.0
    measured = s * 0.998 if layer is None else s * 0.999
    m.update({"ms_preprocess": 0.35, "ms_inference": d["ms"] * (keep if channel else 1.0) * (imgsz / 640) ** 2,
              "ms_nms": 1.1 * (1 + s), "images": 128, "instances": 929,
              "sparsity_target": s, "sparsity": measured, "sparsity_global": measured * 0.97,
              "params": d["params"] * keep, "params_nonzero": d["params"] * (keep if channel else 1 - 0.97 * s),
              "gflops": d["gflops"] * keep * (imgsz / 640) ** 2, "size_mb": d["mb"] * keep,
              "size_mb_compressed": d["mb"] * keep * (1 - 0.8 * s),
              "latency_b1_ms": d["ms"] * 1.4, "latency_b32_ms_per_image": d["ms"] * 0.8})
    return m


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite database: copied per test (creating one costs seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


class Store:
    """A temporary sqlite MLflow store with one helper to log a whole sweep."""

    def __init__(self, root: Path, template: Path | None = None):
        self.root = root
        if template is not None:
            shutil.copyfile(template, root / "mlflow.db")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.t0 = int(time.time() * 1000) - 3_600_000
        self.exps: dict[str, str] = {}

    def experiment(self, name: str = EXP) -> str:
        if name not in self.exps:
            self.exps[name] = self.client.create_experiment(name, artifact_location=str(self.root / "art" / name))
        return self.exps[name]

    def sweep(self, sweep_id: str, jobs: list[dict], exp: str = EXP, start_offset_s: int = 0,
              parent: bool = True) -> tuple[str | None, list[str]]:
        c, eid = self.client, self.experiment(exp)
        start = self.t0 + start_offset_s * 1000
        pid = None
        if parent:
            pid = c.create_run(eid, start_time=start, run_name=f"sweep-{sweep_id}",
                               tags={"sweep_id": sweep_id, "sweep.role": "parent"}).info.run_id
        ids = []
        for i, j in enumerate(jobs):
            ids.append(self.job(eid, sweep_id, pid, start + 1000 * (i + 1), **j))
        if pid:
            c.set_terminated(pid, "FINISHED", end_time=start + 1000 * (len(jobs) + 2))
        return pid, ids

    def job(self, eid: str, sweep_id: str, pid: str | None, start: int, model: str, method: str, s: float,
            recover: str = "none", data: str = "coco-val128", imgsz: int = 640, half: bool = False,
            include: list[str] | None = None, status: str = "FINISHED", drop: tuple[str, ...] = (),
            device: str = "Intel Xeon CPU", batch: int = 32, params_logged: bool = True,
            weights: str | None = None, limit: int | None = None, extra: dict | None = None, seed: int = 0,
            recover_params: dict | None = None) -> str:
        include = include or []
        budget = tuple(sorted((recover_params or {}).items()))
        tags = {"sweep_id": sweep_id, "sweep.role": "job", "config_hash": f"h{hash((model, method, s, recover, imgsz, half, tuple(include), seed, budget)) & 0xffffffff:08x}",
                "git_commit": "0123456789abcdef0123456789abcdef01234567", "device_name": device}
        if pid:
            tags["mlflow.parentRunId"] = pid
        name = contract.run_name(model, method, recover == "none", recover, s)
        run = self.client.create_run(eid, start_time=start, tags=tags, run_name=name)
        rid = run.info.run_id
        params = {"model.name": model, "prune.method": method, "prune.fused": "True",
                  "prune.include": str(include), "prune.exclude": "[]", "sparsity": str(s),
                  "data.name": data, "eval.imgsz": str(imgsz), "eval.half": str(half),
                  "eval.device": "cpu", "eval.batch": str(batch), "recover.method": recover, "prune.seed": str(seed)}
        if recover != "none":
            params["prune.fused"] = "False"
        params["model.weights"] = weights or f"/cache/weights/{model}.pt"
        params["data.limit"] = str(limit)  # the flattened config logs None as "None"
        params.update(recover_params or {})
        metrics = []
        if status == "FINISHED":
            layer = int(include[0].split(".")[1]) if include else None
            vals = job_metrics(model, method, s, imgsz, half, recover, layer)
            vals[contract.latency_batch_metric(batch)] = vals.pop("latency_b32_ms_per_image")
            vals.update(extra or {})
            metrics = [Metric(k, float(v), start + 500, 0) for k, v in vals.items() if k not in drop]
        else:
            self.client.set_tag(rid, "error", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
        logged = [Param(k, v) for k, v in params.items()] if params_logged else []
        self.client.log_batch(rid, metrics=metrics, params=logged)
        self.client.set_terminated(rid, status, end_time=start + 900)
        return rid


def grid(models=("yolov5n", "yolov5s"), methods=("l1_unstructured", "random_unstructured"),
         sparsities=(0.0, 0.3, 0.5, 0.7), **kw) -> list[dict]:
    return [dict(model=m, method=me, s=s, **kw) for m in models for me in methods for s in sparsities]


def png_ok(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 10_000, path
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 400 <= w <= 5000 and 300 <= h <= 5000, (path, w, h)
    return w, h


def pdf_pages(path: Path) -> int:
    return len(pypdf.PdfReader(str(path)).pages)


# ------------------------------------------------------------------ the main sweep


@pytest.fixture(scope="module")
def main_sweep(tmp_path_factory, empty_db):
    root = tmp_path_factory.mktemp("mlf")
    st = Store(root, empty_db)
    jobs = grid() + [dict(model="yolov5s", method="l1_unstructured", s=0.9, status="FAILED")]
    pid, ids = st.sweep("2024-05-01_10-00-00", jobs)
    out = build_report(st.uri, EXP, sweep="2024-05-01_10-00-00", out_root=root / "reports")
    return st, pid, ids, out


def test_main_sweep_files(main_sweep):
    st, pid, ids, out = main_sweep
    assert out == st.root / "reports" / "2024-05-01_10-00-00"
    expected = set(REPORT_FILES) - {"sensitivity.png"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        if name.endswith(".png"):
            png_ok(out / name)
    # title + 4 figures + results table (17 rows -> one page) + the best-run-within-a-budget table
    assert pdf_pages(out / "report.pdf") == 7
    assert not list(st.root.joinpath("reports").glob(".*")), "temporary folder left behind"


def test_main_sweep_csv(main_sweep):
    st, pid, ids, out = main_sweep
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 17 and set(df["run_id"]) == set(ids)
    for col in ("params.model.name", "params.prune.method", "params.sparsity", "params.eval.imgsz",
                "metrics.mAP50-95", "metrics.AR100", "metrics.sparsity", "metrics.latency_b1_ms",
                "tags.sweep_id", "tags.config_hash", "report.outcome", "report.delta.mAP50-95"):
        assert col in df.columns, col
    row = df[(df["params.model.name"] == "yolov5s") & (df["params.prune.method"] == "random_unstructured")
             & (df["params.sparsity"] == 0.5)].iloc[0]
    want = job_metrics("yolov5s", "random_unstructured", 0.5)
    assert row["metrics.mAP50-95"] == pytest.approx(want["mAP50-95"])
    assert row["metrics.gflops"] == pytest.approx(want["gflops"])
    assert row["report.delta.mAP50-95"] == pytest.approx(want["mAP50-95"] - DENSE["yolov5s"]["map"])
    assert row["status"] == "FINISHED" and row["report.outcome"] == "ok"
    failed = df[df["status"] == "FAILED"]
    assert len(failed) == 1 and failed.iloc[0]["report.outcome"] == "failed"
    assert math.isnan(failed.iloc[0]["metrics.mAP50-95"])
    assert "out of memory" in failed.iloc[0]["tags.error"]


def test_main_sweep_markdown(main_sweep):
    st, pid, ids, out = main_sweep
    md = (out / "results.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| yolov5")]
    assert len(rows) == 17
    head = next(l for l in md.splitlines() if l.startswith("| model"))
    for col in ("model", "method", "target", "measured", "mAP50-95", "Δ vs dense", "mAP50", "AR100",
                "ms/image", "GFLOPs"):
        assert f" {col} " in head
    failed = [l for l in rows if "FAILED" in l]
    assert len(failed) == 1 and "missing" in failed[0] and "out of memory" in failed[0]
    dense_s = next(l for l in rows if l.startswith("| yolov5s | l1_unstructured | 0.00 "))
    assert "| 0.374 | +0.000 (+0.0%) |" in dense_s
    assert "2024-05-01_10-00-00" in md and "![pareto](pareto.png)" in md


def test_main_sweep_artifacts(main_sweep):
    st, pid, ids, out = main_sweep
    arts = st.client.list_artifacts(pid, "report")
    assert {Path(a.path).name for a in arts} == {p.name for p in out.iterdir()}
    assert all(a.path.startswith("report/") for a in arts)
    for child in ids:  # nothing logged on the jobs
        assert st.client.list_artifacts(child) == []


def test_pdf_is_vector_with_title_page(main_sweep):
    st, pid, ids, out = main_sweep
    reader = pypdf.PdfReader(str(out / "report.pdf"))
    first = reader.pages[0].extract_text()
    for s in ("2024-05-01_10-00-00", "yolov5n", "yolov5s", "l1_unstructured", "coco-val128",
              "Intel Xeon CPU", "0123456789ab"):
        assert s in first, s
    for page in reader.pages[1:5]:  # figures: vector drawings, no raster images
        assert len(page.images) == 0
    assert "yolov5s" in reader.pages[5].extract_text()  # the table page is text


def test_select_by_parent_run_id_and_latest(main_sweep):
    st, pid, ids, out = main_sweep
    by_parent = Q.select_runs(st.uri, EXP, parent_run_id=pid)
    assert by_parent.mode == "parent" and by_parent.sweep_id == "2024-05-01_10-00-00"
    assert sorted(r.info.run_id for r in by_parent.runs) == sorted(ids)
    latest = Q.select_runs(st.uri, EXP)  # default: the most recent sweep
    assert latest.mode == "latest" and latest.parent_run_id == pid
    assert sorted(r.info.run_id for r in latest.runs) == sorted(ids)


# ------------------------------------------------------------------ selection across sweeps


def test_latest_sweep_and_all(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    old_pid, old = st.sweep("old", grid(models=("yolov5n",), methods=("l1_unstructured",)), start_offset_s=0)
    new_pid, new = st.sweep("new", grid(models=("yolov5s",), methods=("l1_unstructured",))
                            + [dict(model="yolov5s", method="l1_unstructured", s=0.9, status="FAILED")],
                            start_offset_s=600)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    assert out.name == "new"
    assert set(pd.read_csv(out / "results.csv")["run_id"]) == set(new)
    assert st.client.list_artifacts(new_pid, "report") and not st.client.list_artifacts(old_pid)

    out_all = build_report(st.uri, EXP, sweep="all", out_root=tmp_path / "r")
    assert out_all == tmp_path / "r" / "all"
    df = pd.read_csv(out_all / "results.csv")
    assert set(df["run_id"]) == set(old) | set(new[:-1])  # finished job runs only, no parents
    assert (df["status"] == "FINISHED").all()
    assert pdf_pages(out_all / "report.pdf") == 7  # two model sizes: + the best-run-within-a-budget table


def test_resumed_sweep_includes_reused_runs(tmp_path, empty_db):
    """resume by config hash: runs of an earlier sweep that a later sweep skipped belong to both."""
    st = Store(tmp_path, empty_db)
    _, first = st.sweep("2024-05-01_09-00-00", grid(models=("yolov5n",), methods=("l1_unstructured",)))
    pid, second = st.sweep("2024-05-02_09-00-00", [dict(model="yolov5n", method="l1_unstructured", s=0.9)],
                           start_offset_s=100)
    for rid in first:
        st.client.set_tag(rid, "also_in_sweep.2024-05-02_09-00-00", "true")
    sel = Q.select_runs(st.uri, EXP)  # the most recent sweep
    assert sel.sweep_id == "2024-05-02_09-00-00" and sel.parent_run_id == pid
    assert {r.info.run_id for r in sel.runs} == set(first) | set(second)
    assert any("reused" in n for n in sel.notes)
    assert {r.info.run_id for r in Q.select_runs(st.uri, EXP, parent_run_id=pid).runs} == set(first) | set(second)
    assert {r.info.run_id for r in Q.select_runs(st.uri, EXP, sweep="2024-05-01_09-00-00").runs} == set(first)
    frame = Q.runs_frame(sel.runs)
    assert not [c for c in frame.columns if "also_in_sweep" in c]


def test_unknown_sweep_lists_recent(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    st.sweep("s1", grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.0, 0.5)))
    with pytest.raises(ReportError, match=r"no runs with sweep_id='nope'.*s1"):
        build_report(st.uri, EXP, sweep="nope", out_root=tmp_path / "r")
    with pytest.raises(ReportError, match="experiment 'other' not found"):
        build_report(st.uri, "other", out_root=tmp_path / "r")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ edge cases


def test_all_failed_raises_and_writes_nothing(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    jobs = [dict(model="yolov5n", method="l1_unstructured", s=s, status="FAILED") for s in (0.0, 0.5)]
    pid, _ = st.sweep("bad", jobs)
    with pytest.raises(ReportError, match=r"all 2 runs of sweep 'bad' failed.*out of memory"):
        build_report(st.uri, EXP, out_root=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "r" / "bad").exists()
    assert st.client.list_artifacts(pid) == []


def test_one_point_without_dense_or_optional_metrics(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    drop = ("latency_b1_ms", "latency_b32_ms_per_image", "ms_preprocess", "ms_nms", "size_mb_compressed")
    st.sweep("one", [dict(model="yolov5n", method="l1_unstructured", s=0.5, drop=drop)])
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    for name in ("accuracy_vs_sparsity.png", "retention_vs_sparsity.png", "speed_vs_sparsity.png", "pareto.png"):
        png_ok(out / name)
    assert pdf_pages(out / "report.pdf") == 6
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 1 and "metrics.latency_b1_ms" not in df.columns
    md = (out / "results.md").read_text()
    assert "no dense run of yolov5n" in md


def test_dense_only_single_model(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    st.sweep("dense", [dict(model="yolov5s", method="l1_unstructured", s=0.0)])
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    assert pdf_pages(out / "report.pdf") == 6
    png_ok(out / "accuracy_vs_sparsity.png")


def test_dense_reference_from_earlier_sweep(tmp_path, empty_db):
    """A sweep without sparsity 0 borrows the dense run of the same model and setting from the experiment."""
    from sweep.report import build as B

    st = Store(tmp_path, empty_db)
    _, (dense_id,) = st.sweep("base", [dict(model="yolov5n", method="l1_unstructured", s=0.0)])
    st.sweep("other-size", [dict(model="yolov5n", method="l1_unstructured", s=0.0, imgsz=320)], start_offset_s=50)
    st.sweep("pruned", [dict(model="yolov5n", method="l1_unstructured", s=s) for s in (0.3, 0.6)],
             start_offset_s=100)
    sel = Q.select_runs(st.uri, EXP, sweep="pruned")
    df = T.normalize(Q.runs_frame(sel.runs))
    refs = T.dense_refs(df, "setting", B._extra_dense(sel, df))
    [(key, ref)] = refs.items()  # the 640 px dense run only, not the 320 px one
    assert key == ("yolov5n", "coco-val128 · 640px · FP32") and ref.outside and ref.run_ids == [dense_id]
    assert ref.get("mAP50-95") == pytest.approx(DENSE["yolov5n"]["map"])


def test_mixed_imgsz_and_half_are_split(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    jobs = (grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.0, 0.5))
            + grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.0, 0.5), imgsz=320)
            + grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.0, 0.5), half=True))
    st.sweep("mixed", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["report.setting"].unique()) == ["coco-val128 · 320px · FP32", "coco-val128 · 640px · FP16",
                                                      "coco-val128 · 640px · FP32"]
    # every run is compared with the dense run of its own setting
    r320 = df[(df["params.eval.imgsz"] == 320) & (df["params.sparsity"] == 0.5)].iloc[0]
    d320 = df[(df["params.eval.imgsz"] == 320) & (df["params.sparsity"] == 0.0)].iloc[0]
    assert r320["report.delta.mAP50-95"] == pytest.approx(r320["metrics.mAP50-95"] - d320["metrics.mAP50-95"])
    md = (out / "results.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| model"))
    assert "| setting |" in head
    assert "never mixed on one curve" in md
    # one row of panels per setting: the accuracy figure is three panel rows tall
    w, h = png_ok(out / "accuracy_vs_sparsity.png")
    assert h > 0.75 * w
    norm = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP).runs))
    refs = T.dense_refs(norm)
    fig = F.curve_figure(T.dedupe(norm), refs, [F.metric_panel("mAP50-95", "mAP50-95", "mAP50-95")],
                         F.Style.build(norm["model"], norm["method"]), "t")
    assert len([a for a in fig.axes if a.get_title()]) == 3
    assert all(len(a.get_lines()) == 2 for a in fig.axes[:3])  # one curve + one dense line each


def test_recover_side_by_side(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    jobs = grid(models=("yolov5n",), methods=("l1_unstructured",)) + \
        grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.3, 0.5, 0.7), recover="bn")
    st.sweep("rec", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    assert pdf_pages(out / "report.pdf") == 7  # + recovery.png
    norm = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP).runs))
    fig = F.curve_figure(T.dedupe(norm), T.dense_refs(norm),
                         [F.metric_panel("mAP50-95", "mAP50-95", "mAP50-95"), F.metric_panel("AR100", "AR100", "AR100")],
                         F.Style.build(norm["model"], norm["method"]), "t")
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["mAP50-95 · recover=none", "mAP50-95 · recover=bn", "AR100 · recover=none",
                      "AR100 · recover=bn"]
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()  # comparable side by side


def test_recovery_view_keeps_finetune_budgets_apart_and_plots_accuracy_against_the_budget(tmp_path, empty_db):
    """Fine-tunes of different budgets were one point (the most recent hid the other); the report now labels
    each budget and draws what recovery buys: accuracy vs sparsity per recovery, accuracy vs iterations."""
    st = Store(tmp_path, empty_db)
    base = dict(model="yolov5n", method="l1_unstructured")
    jobs = grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.0, 0.3, 0.5))
    jobs += grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.3, 0.5), recover="bn",
                 extra={"recover_iters": 0.0})
    bn = {s: job_metrics("yolov5n", "l1_unstructured", s, recover="bn")["mAP50-95"] for s in (0.3, 0.5)}
    for iters, gain in ((8, 0.01), (40, 0.03)):
        jobs += [dict(base, s=s, recover="finetune", recover_params={"recover.iters": str(iters), "recover.epochs": "1"},
                      extra={"recover_iters": float(iters), "mAP50-95": bn[s] + gain}) for s in (0.3, 0.5)]
    st.sweep("ft", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    assert png_ok(out / "recovery.png")
    norm = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP).runs))
    points = T.aggregate_seeds(T.dedupe(norm))
    assert sorted(set(points["recover"]), key=T.recover_sort_key) == ["none", "bn", "finetune 8 it", "finetune 40 it"]
    fig = F.recovery_figure(points, T.dense_refs(norm), "t")
    by_recovery, by_budget = fig.axes[:2]
    assert "accuracy by recovery" in by_recovery.get_title() and "fine-tune budget" in by_budget.get_title()
    assert [l.get_label() for l in by_recovery.get_lines()][:4] == [  # the test store's none runs are fused
        "none (fused)", "bn (unfused)", "finetune 8 it (unfused)", "finetune 40 it (unfused)"]
    curves = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in by_budget.get_lines()
              if l.get_label().startswith("sparsity")}
    assert sorted(curves) == ["sparsity 0.30", "sparsity 0.50"]
    for s in (0.3, 0.5):
        xs, ys = curves[f"sparsity {s:.2f}"]
        assert xs == [0.0, 8.0, 40.0]
        assert ys == pytest.approx([bn[s], bn[s] + 0.01, bn[s] + 0.03])


def test_sensitivity_heatmap(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    layers = ["model.0.conv", "model.2.cv1.conv", "model.10.conv", "model.24.m.0"]
    jobs = [dict(model="yolov5n", method="l1_unstructured", s=0.0)]
    jobs += [dict(model="yolov5n", method="l1_unstructured", s=s, include=[l]) for l in layers for s in (0.3, 0.6, 0.9)]
    st.sweep("sens", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    assert {p.name for p in out.iterdir()} == set(REPORT_FILES)
    png_ok(out / "sensitivity.png")
    assert pdf_pages(out / "report.pdf") == 1 + 5 + 1
    base = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP).runs))
    refs = T.dense_refs(base)
    norm = T.add_dense_columns(base, refs)
    sens = norm[norm["include"].map(bool)]
    fig = F.sensitivity_figure(sens, refs, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == layers  # network order, not lexicographic
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.30", "0.60", "0.90"]
    assert "per-layer" in (out / "results.md").read_text()


# ------------------------------------------------------------------ CLI


def test_cli_errors_exit_2(tmp_path, capsys, empty_db):
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["--tracking-uri", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep.report: error: no MLflow store at") and err.count("\n") == 1
    assert not missing.exists() and not missing.parent.exists()

    st = Store(tmp_path, empty_db)
    st.sweep("s1", [dict(model="yolov5n", method="l1_unstructured", s=0.5, status="FAILED")])
    assert main(["--tracking-uri", st.uri, "--sweep", "s1", "--out", str(tmp_path / "r")]) == 2
    assert "failed" in capsys.readouterr().err
    assert main(["--tracking-uri", st.uri, "--parent-run-id", "0" * 32]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_builds_and_module_entry_point(tmp_path, capsys, empty_db):
    st = Store(tmp_path, empty_db)
    st.sweep("cli", grid(models=("yolov5n",), methods=("l1_unstructured",), sparsities=(0.0, 0.5)))
    assert main(["--tracking-uri", st.uri, "--out", str(tmp_path / "r"), "--no-attach"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "r" / "cli"
    assert (tmp_path / "r" / "cli" / "report.pdf").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--sweep", "a", "--all"])
    assert e.value.code == 2
    # the real `python -m sweep.report`: a clear one-line error, exit 2, no traceback
    bad = subprocess.run([sys.executable, "-m", "sweep.report", "--tracking-uri", st.uri, "--sweep", "nope"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "sweep.report: error: no runs with sweep_id='nope'" in bad.stderr


# ------------------------------------------------------------------ units


def test_pareto_front():
    import numpy as np

    cost = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    val = np.array([0.9, 0.2, 0.5, 0.1, 0.5])
    assert F.pareto_front(cost, val).tolist() == [1, 2, 0]


def test_parsers_and_order():
    assert T.parse_list("[]") == () and T.parse_list("['model.3.conv', 'model.4.*']") == ("model.3.conv", "model.4.*")
    assert T.parse_bool("True") is True and T.parse_bool("False") is False and T.parse_bool("None") is None
    assert sorted(["yolov5x", "yolov5n", "custom", "yolov5m", "yolov5s"], key=T.model_sort_key) == \
        ["yolov5n", "yolov5s", "yolov5m", "yolov5x", "custom"]
    style = F.Style.build(["yolov5s", "yolov5n"], ["a"])
    assert style.colour("yolov5n") == F.SIZE_COLOURS["n"] and style.colour("yolov5s") == F.SIZE_COLOURS["s"]


def test_a_sweep_at_another_eval_batch_keeps_its_latency(tmp_path, empty_db):
    """Regression: the job names the metric after eval.batch; the report used to read only batch 32's."""
    st = Store(tmp_path, empty_db)
    st.sweep("b16", grid(models=("yolov5n",), methods=("l1_unstructured",), batch=16))
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    df = pd.read_csv(out / "results.csv")
    assert df["metrics.latency_b16_ms_per_image"].notna().all()
    text = " ".join(page.extract_text() for page in pypdf.PdfReader(out / "report.pdf").pages)
    assert "Latency, batch 16" in text and "batch 32" not in text


def test_run_names_parse_back_when_params_are_missing(tmp_path, empty_db):
    """Regression: ``yolov5n-global_l1-unfused-s0.50`` once parsed as model ``yolov5n-global_l1``."""
    assert contract.parse_run_name("yolov5n-global_l1-unfused-s0.50") == contract.RunName(
        "yolov5n", "global_l1", False, "none", 0.5)
    assert contract.parse_run_name("yolov5n-7-k5-l1_unstructured-unfused-bn-s0.30") == contract.RunName(
        "yolov5n-7-k5", "l1_unstructured", False, "bn", 0.3)
    assert contract.parse_run_name("yolov5x-l1_unstructured-s0.30") == contract.RunName(
        "yolov5x", "l1_unstructured", True, "none", 0.3)
    assert contract.parse_run_name("sweep-2026-12-01_10-00-00") is None
    st = Store(tmp_path, empty_db)
    st.sweep("old", [dict(model="yolov5n", method="l1_unstructured", s=0.0, params_logged=False),
                     dict(model="yolov5n", method="l1_unstructured", s=0.5, recover="bn", params_logged=False)])
    sel = Q.select_runs(st.uri, EXP, sweep="old")
    df = T.normalize(Q.runs_frame(sel.runs))
    assert set(df["model"]) == {"yolov5n"} and set(df["method"]) == {"l1_unstructured"}
    assert sorted(df["recover"]) == ["bn", "none"] and sorted(df["target"]) == [0.0, 0.5]


# ------------------------------------------------------------------ issue #17: a report that reads finished


def _pdf_text(path: Path) -> list[str]:
    return [page.extract_text() for page in pypdf.PdfReader(str(path)).pages]


def test_title_page_plurals_device_subset_and_custom_checkpoint(tmp_path, empty_db):
    """#17: "runs: 3 runs: 3 ok", "1 finished runs", a data.limit subset shown as the full set, a custom
    checkpoint labelled just "custom", and the CPU's model name as the device."""
    st = Store(tmp_path, empty_db)
    cpu = "AMD EPYC 7B13 64-Core Processor (2 CPUs)"
    ckpt = "/home/me/runs/train/exp3/weights/best.pt"
    _, (old,) = st.sweep("first", [dict(model="custom", method="l1_unstructured", s=0.0, weights=ckpt, limit=32,
                                        device=cpu)])
    st.sweep("second", [dict(model="custom", method="l1_unstructured", s=s, weights=ckpt, limit=32, device=cpu)
                        for s in (0.3, 0.5)], start_offset_s=100)
    st.client.set_tag(old, "also_in_sweep.second", "true")
    out = build_report(st.uri, EXP, sweep="second", out_root=tmp_path / "r")
    first = _pdf_text(out / "report.pdf")[0]
    flat = " ".join(first.split())
    assert "custom (best.pt)" in flat
    assert "coco-val128 (first 32 images) · 640px · FP32" in flat  # the settings line
    assert cpu in flat
    assert "3, all finished" in flat and "runs: 3 ok" not in flat and "3 runs" not in flat
    assert "1 finished run of an earlier sweep was reused" in flat and "1 finished runs" not in flat
    md = (out / "results.md").read_text()
    assert "- **runs**: 3, all finished" in md
    assert "| custom (best.pt) |" in md
    figs = " ".join(_pdf_text(out / "report.pdf")[1:])
    assert "custom (best.pt)" in figs and "first 32 images" in figs  # legends and panel titles


def test_runs_field_counts_each_outcome_once(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)
    st.sweep("mixed", [dict(model="yolov5n", method="l1_unstructured", s=0.0),
                       dict(model="yolov5n", method="l1_unstructured", s=0.5, status="FAILED")])
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    md = (out / "results.md").read_text()
    assert "- **runs**: 2: 1 finished, 1 failed" in md
    assert "1 run did not finish" in md


def test_labels_unit():
    assert T.model_label("custom", "C:\\runs\\exp\\weights\\last.pt") == "custom (last.pt)"
    assert T.model_label("custom", "runs/exp/best.pt") == "custom (best.pt)"
    assert T.model_label("yolov5n", "/cache/weights/yolov5n.pt") == "yolov5n"
    assert T.data_label("coco", "None") == "coco" and T.data_label("coco", "1") == "coco (first 1 image)"
    assert T.data_label("coco", "500") == "coco (first 500 images)"


def test_subsets_are_separate_settings(tmp_path, empty_db):
    """A data.limit subset is never compared with the full set's dense run."""
    st = Store(tmp_path, empty_db)
    st.sweep("subset", [dict(model="yolov5n", method="l1_unstructured", s=0.0),
                        dict(model="yolov5n", method="l1_unstructured", s=0.0, limit=32),
                        dict(model="yolov5n", method="l1_unstructured", s=0.5, limit=32)])
    df = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP).runs))
    assert set(T.dense_refs(df)) == {("yolov5n", "coco-val128 · 640px · FP32"),
                                     ("yolov5n", "coco-val128 (first 32 images) · 640px · FP32")}


def _noisy_latency(s: float, load: float, dense_ms: float = 68.0) -> dict:
    """Latency metrics of an unstructured run on a machine ``load`` times slower than quiet, noisy: the
    model's and the dense model's medians, timed alternately, both inflated alike."""
    b1, q1, q3 = contract.LATENCY_B1, *contract.latency_quartiles(contract.LATENCY_B1)
    d, dq1, dq3 = contract.LATENCY_DENSE_B1, *contract.latency_quartiles(contract.LATENCY_DENSE_B1)
    m = dense_ms * load * (1.0 if s == 0 else 0.97)  # a 3% "speed-up" that is noise
    dm = dense_ms * load
    return {b1: m, q1: 0.8 * m, q3: 1.3 * m, d: dm, dq1: 0.8 * dm, dq3: 1.3 * dm,
            contract.LATENCY_SPEEDUP_B1: dm / m, contract.LATENCY_SPREAD_B1: 0.5}


def test_busy_machine_speed_figures(tmp_path, empty_db):
    """#17 finding 4: latency 4158 ms at 0.6 against 407 ms dense under load. The report draws the spread,
    warns about the busy machine, and plots speed relative to the dense model timed alongside, so an
    unstructured method is never faster than dense beyond its noise."""
    st = Store(tmp_path, empty_db)
    jobs = [dict(model="yolov5n", method="l1_unstructured", s=s, extra=_noisy_latency(s, load))
            for s, load in ((0.0, 6.0), (0.3, 1.0), (0.6, 61.0))]
    st.sweep("busy", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    md = (out / "results.md").read_text()
    assert "busy machine" in md and "3 runs" in md
    df = pd.read_csv(out / "results.csv")
    assert {contract.latency_quartiles(contract.LATENCY_B1)[0], contract.LATENCY_SPEEDUP_B1} <= {
        c[len("metrics."):] for c in df.columns if c.startswith("metrics.")}

    norm = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP).runs))
    pts = F.with_relative_latency(T.dedupe(norm))
    for _, r in pts.iterrows():  # within its noise of dense (1.0), whatever the load
        assert r[F.REL_LATENCY_LO] <= 1.0 <= r[F.REL_LATENCY_HI], r["target"]
        assert 0.95 < r[F.REL_LATENCY] < 1.1
    fig = F.pareto_figure(T.dedupe(norm), F.Style.build(norm["model"], norm["method"]), "t")
    ax = fig.axes[0]
    assert "relative to dense" in ax.get_title()
    xs = [x for line in ax.get_lines() if line.get_marker() not in ("|", "_") for x in line.get_xdata()]
    assert len(xs) >= 3 and max(xs) < 1.1  # not 61x: the load cancels in the same-process ratio
    assert ax.collections, "no error bars on the Pareto time axis"

    refs = T.dense_refs(norm, "timing_setting")
    panel = F.latency_panel(contract.LATENCY_B1, "Latency, batch 1", "ms")
    fig = F.curve_figure(T.dedupe(norm), refs, [panel], F.Style.build(norm["model"], norm["method"]), "t",
                         group_col="timing_setting", facet_recover=False)
    ax = fig.axes[0]
    assert any(type(c).__name__ == "LineCollection" for c in ax.collections), "no IQR error bars"
    assert any(type(p).__name__ in ("Rectangle", "Polygon") for p in ax.patches), "no dense IQR band"


def test_pdf_pages_are_a4_filled(main_sweep):
    """#17: every PDF page is A4 landscape (figures used to keep their own, smaller, page sizes)."""
    st, pid, ids, out = main_sweep
    for page in pypdf.PdfReader(str(out / "report.pdf")).pages:
        w, h = float(page.mediabox.width), float(page.mediabox.height)
        assert (round(w), round(h)) == (842, 595), (w, h)


def test_latency_stats_and_pair():
    import torch

    from sweep.evaluate.latency import LatencyStats, measure_latency, measure_latency_pair

    st = LatencyStats.of([10.0, 11.0, 12.0, 13.0, 100.0])
    assert (st.median_ms, st.q1_ms, st.q3_ms, st.min_ms, st.max_ms, st.iters) == (12.0, 11.0, 13.0, 10.0, 100.0, 5)
    assert st.spread == pytest.approx(2 / 12) and st.per_image(2).median_ms == 6.0
    net = torch.nn.Conv2d(3, 4, 3).eval()
    one = measure_latency(net, device=torch.device("cpu"), half=False, imgsz=32, batch=1, iters=5)
    assert one.iters == 5 and one.min_ms <= one.q1_ms <= one.median_ms <= one.q3_ms <= one.max_ms
    a, b = measure_latency_pair(net, net, device=torch.device("cpu"), half=False, imgsz=32, batch=1, iters=6)
    assert a.iters == b.iters == 6


def test_a_killed_report_build_leaves_nothing_behind_after_the_next_build(tmp_path, empty_db):
    """A build killed mid-way (SIGKILL skips its cleanup) left a hidden folder; the next build of that report
    removes it, and rebuilding with ``--sweep`` gives the full report."""
    import os

    st = Store(tmp_path, empty_db)
    st.sweep("k1", grid(models=("yolov5n",), methods=("l1_unstructured",)))
    root = tmp_path / "r"
    stale = root / ".k1.abc123"
    stale.mkdir(parents=True)
    (stale / "accuracy_vs_sparsity.png").write_bytes(b"half-written")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    out = build_report(st.uri, EXP, sweep="k1", out_root=root)
    assert not stale.exists() and [p.name for p in root.iterdir()] == ["k1"]
    assert (out / "report.pdf").is_file()


# ------------------------------------------------------------------ seeds, intervals, cross-size Pareto (#14)


def test_runs_differing_only_by_seed_are_one_point_mean_and_min_max(tmp_path, empty_db):
    """prune.seed 0, 1, 2 of the random baseline: one point per sparsity, the mean with its min-max over the seeds
    and the number of seeds, in the tables and as a band in the figures; a single-seed method stays as it is."""
    st = Store(tmp_path, empty_db)
    base = {s: job_metrics("yolov5n", "random_unstructured", s)["mAP50-95"] for s in (0.3, 0.5)}
    jobs = [dict(model="yolov5n", method="l1_unstructured", s=0.0),
            dict(model="yolov5n", method="l1_unstructured", s=0.3)]
    jobs += [dict(model="yolov5n", method="random_unstructured", s=s, seed=seed,
                  extra={"mAP50-95": base[s] + 0.01 * (seed - 1) + (0.005 if seed == 2 else 0.0)})
             for s in (0.3, 0.5) for seed in (0, 1, 2)]
    st.sweep("seeds", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")

    df = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP, sweep="seeds").runs))
    points = T.aggregate_seeds(T.dedupe(df))
    rnd = points[(points["method"] == "random_unstructured")].set_index("target")
    assert list(rnd["n_seeds"]) == [3, 3] and rnd.loc[0.3, "seeds"] == "0, 1, 2"
    col = "metrics.mAP50-95"
    for s in (0.3, 0.5):
        vals = [base[s] - 0.01, base[s], base[s] + 0.015]
        assert rnd.loc[s, col] == pytest.approx(sum(vals) / 3)
        assert rnd.loc[s, T.SEED_MIN + col] == pytest.approx(vals[0])
        assert rnd.loc[s, T.SEED_MAX + col] == pytest.approx(vals[2])
    l1 = points[(points["method"] == "l1_unstructured") & ~points["is_dense"]]
    assert list(l1["n_seeds"]) == [1] and T.SEED_MIN + col not in l1.dropna(axis=1, how="all").columns
    assert len(points) == 4  # dense, l1 0.3, random 0.3 and 0.5

    md = (out / "results.md").read_text()
    assert "## Across seeds" in md and "min–max" in md
    row = next(line for line in md.splitlines() if "random_unstructured" in line and "| 0.30 |" in line
               and "3 (0, 1, 2)" in line)
    assert f"{sum([base[0.3] - 0.01, base[0.3], base[0.3] + 0.015]) / 3:.3f} ({base[0.3] - 0.01:.3f}–" in row
    assert "| seed |" in md  # the per-run table says which seed each run had
    assert "prune.seed values" in md  # the note
    fig = F.curve_figure(points, T.dense_refs(df), [F.metric_panel("mAP50-95", "mAP50-95", "mAP50-95")],
                         F.Style.build(points["model"], points["method"]), "t")
    assert any(c.__class__.__name__ in ("PolyCollection", "FillBetweenPolyCollection")
               for c in fig.axes[0].collections)  # the min-max band
    assert any("prune.seed" in t.get_text() for t in fig.legends[0].get_texts())


def test_bootstrap_intervals_are_error_bars_on_the_accuracy_curves(tmp_path, empty_db):
    st = Store(tmp_path, empty_db)

    def ci(model, s, half_width):
        m = job_metrics(model, "l1_unstructured", s)
        out = {contract.BOOTSTRAP_RESAMPLES: 1000}
        for name in ("mAP50-95", "mAP50", "AR100"):
            lo, hi = contract.interval_metrics(name)
            out |= {lo: m[name] - half_width, hi: m[name] + half_width}
        return out

    st.sweep("ci", [dict(model="yolov5n", method="l1_unstructured", s=s, extra=ci("yolov5n", s, 0.02))
                    for s in (0.0, 0.3, 0.5)])
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    md = (out / "results.md").read_text()
    assert "95% percentile bootstrap intervals" in md and "1000 resamples" in md
    df = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP, sweep="ci").runs))
    points = T.aggregate_seeds(T.dedupe(df))
    panel = F.metric_panel("mAP50-95", "mAP50-95", "mAP50-95", interval=True)
    assert panel.spread == ("mAP50-95_lo", "mAP50-95_hi")
    fig = F.curve_figure(points, T.dense_refs(df), [panel], F.Style.build(points["model"], points["method"]), "t")
    ax = fig.axes[0]
    assert ax.containers, "no error bars drawn"
    # the dense line's band
    assert any(p.__class__.__name__ == "Rectangle" or "Polygon" in p.__class__.__name__ for p in ax.patches)


def test_cross_size_pareto_front_and_best_run_within_a_budget(tmp_path, empty_db):
    """Pruned yolov5s against dense yolov5n on one front per cost axis, and the budget table's answer."""
    st = Store(tmp_path, empty_db)
    s_pruned = job_metrics("yolov5s", "l1_unstructured", 0.8)
    better = {"mAP50-95": 0.300}  # a pruned yolov5s more accurate than dense yolov5n (0.280) at fewer weights
    assert s_pruned["params_nonzero"] < DENSE["yolov5n"]["params"]
    jobs = [dict(model="yolov5n", method="l1_unstructured", s=s) for s in (0.0, 0.3, 0.5)]
    jobs += [dict(model="yolov5s", method="l1_unstructured", s=0.0),
             dict(model="yolov5s", method="l1_unstructured", s=0.8, extra=better)]
    st.sweep("sizes", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    png_ok(out / "pareto.png")

    df = T.normalize(Q.runs_frame(Q.select_runs(st.uri, EXP, sweep="sizes").runs))
    points = T.aggregate_seeds(T.dedupe(df, by_device=True), by_device=True)
    table = T.budget_table(points)
    params = table[table["cost"] == "non-zero parameters"].set_index("budget: a dense run")
    n_row = params.loc[next(b for b in params.index if b.startswith("yolov5n:"))]
    assert n_row["best run within it"] == "yolov5s·l1_unstructured·0.80"
    assert n_row["mAP50-95"] == "0.300" and n_row["dense mAP50-95"] == "0.280" and n_row["gain"] == "+0.020"
    s_row = params.loc[next(b for b in params.index if b.startswith("yolov5s:"))]
    assert s_row["best run within it"] == "yolov5s·l1_unstructured·0.00" and s_row["gain"] == "+0.000"
    assert set(table["cost"]) == {"non-zero parameters", "GFLOPs", "batch-1 latency", "compressed size (zstd)"}

    fig = F.pareto_figure(points, F.Style.build(points["model"], points["method"]), "t")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert len(titles) == 4 and any("batch-1 latency" in t for t in titles)  # absolute: two sizes on one axis
    labels = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert "yolov5s·l1_unstructured·0.80" in labels and "yolov5n·l1_unstructured·0.00" in labels
    md = (out / "results.md").read_text()
    assert "## Best run within a budget (every model size)" in md and "yolov5s·l1_unstructured·0.80" in md


def test_high_compression_grid_points_name_parse_and_label(tmp_path, empty_db):
    """ShrinkBench's 16x / 32x points (0.9375, 0.96875) are valid, named without rounding and shown as such."""
    import yaml

    from sweep.config.resolve import normalize_sparsity

    grid_yaml = yaml.safe_load((REPO / "conf" / "experiment" / "grid.yaml").read_text())
    values = [normalize_sparsity(float(v)) for v in str(grid_yaml["hydra"]["sweeper"]["params"]["sparsity"]).split(",")]
    assert {0.9375, 0.96875} <= set(values)
    names = [contract.run_name("yolov5n", "l1_unstructured", True, "none", v) for v in values]
    assert len(set(names)) == len(names)
    assert names[-2:] == ["yolov5n-l1_unstructured-s0.9375", "yolov5n-l1_unstructured-s0.96875"]
    assert [contract.parse_run_name(n).sparsity for n in names] == values
    assert contract.run_name("yolov5x", "l1_unstructured", True, "none", 0.3).endswith("-s0.30")  # names unchanged

    st = Store(tmp_path, empty_db)
    st.sweep("hc", [dict(model="yolov5n", method="l1_unstructured", s=s) for s in (0.0, 0.9, 0.9375, 0.96875)])
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    md = (out / "results.md").read_text()
    assert "| 0.9375 |" in md and "| 0.96875 |" in md
    png_ok(out / "accuracy_vs_sparsity.png")


def test_onnx_runtime_panels_say_median_without_an_iqr_they_do_not_have(tmp_path, empty_db):
    """Regression: ONNX Runtime's latency panels were titled 'bars, band: IQR', but only medians are logged."""
    st = Store(tmp_path, empty_db)
    jobs = [dict(j, extra={contract.ORT_LATENCY_B1: 40.0 * (1 - 0.3 * j["s"]), "latency_b1_ms_q1": 60.0,
                           "latency_b1_ms_q3": 70.0})
            for j in grid(models=("yolov5n",), methods=("l1_unstructured",))]
    st.sweep("ort", jobs)
    out = build_report(st.uri, EXP, out_root=tmp_path / "r")
    text = " ".join(" ".join(page.split()) for page in _pdf_text(out / "report.pdf"))
    assert "ONNX Runtime latency, batch 1 (median)" in text
    assert "ONNX Runtime latency, batch 1 (median; bars" not in text
    assert "Latency, batch 1 (median; bars, band: IQR)" in text  # PyTorch's has its quartiles
