"""Every kind of bad input is one clear error before any MLflow run exists (the newcomer's findings).

Each case is a real file or folder a user could point the tool at; ``run_job`` must raise the tool's
own error type (whose message names the key or file and what is allowed), leave no run in the store
and write nothing into the job's output folder.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from helpers import make_cfg, runs

from sweep.assets import AssetError
from sweep.config.schema import ConfigError
from sweep.data import DataError
from sweep.job import JobContext, run_job
from sweep.model import CheckpointError, fuse, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.assets


def small_dataset(root: Path, val128_dir: Path, n: int = 4) -> Path:
    """``n`` real coco-val128 images with their labels, in a dataset folder of our own."""
    images = sorted((val128_dir / "images" / "val2017").glob("*.jpg"))[:n]
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for im in images:
        shutil.copy(im, root / "images" / "val" / im.name)
        shutil.copy(val128_dir / "labels" / "val2017" / f"{im.stem}.txt", root / "labels" / "val" / f"{im.stem}.txt")
    return root


def expect_no_run(tmp_path: Path, cfg, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        run_job(cfg, JobContext(tmp_path / "job"))
    assert runs(tmp_path) == []
    assert not (tmp_path / "job").exists()


def own_data(tmp_path: Path, root: Path, *extra: str):
    return make_cfg(tmp_path, "model=yolov5n", "data=custom", "data.yaml=null", f"data.path={root}", "data.val=images/val",
                    "eval.imgsz=320", *extra)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"<html>rate limited</html>" * 10, "not a PyTorch checkpoint"),
])
def test_unusable_weights_files(tmp_path, assets, content, match):
    bad = tmp_path / "best.pt"
    bad.write_bytes(content)
    cfg = make_cfg(tmp_path, "model=custom", f"model.weights={bad}", "data=coco-val128", "data.limit=4")
    expect_no_run(tmp_path, cfg, CheckpointError, match)


def test_a_malformed_label_line_names_file_and_line(tmp_path, assets, val128_dir):
    root = small_dataset(tmp_path / "ds", val128_dir)
    first = sorted((root / "labels" / "val").glob("*.txt"))[0]
    first.write_text(first.read_text() + "abc\n")
    expect_no_run(tmp_path, own_data(tmp_path, root), DataError, rf"{first.name}:\d+: malformed label line 'abc'")


def test_a_class_id_the_checkpoint_does_not_have_blames_the_checkpoint(tmp_path, assets, val128_dir):
    root = small_dataset(tmp_path / "ds", val128_dir)
    first = sorted((root / "labels" / "val").glob("*.txt"))[0]
    first.write_text("200 0.5 0.5 0.1 0.1\n")
    expect_no_run(tmp_path, own_data(tmp_path, root), DataError, r"class id 200 .*checkpoint model.weights=.*80 classes")


def test_a_dataset_of_unreadable_images(tmp_path, assets):
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    for i in range(3):
        (root / "images" / "val" / f"{i}.jpg").write_bytes(b"not a jpeg")
    expect_no_run(tmp_path, own_data(tmp_path, root), DataError, "no usable images")


def test_a_dataset_without_labels_is_refused_not_scored_minus_one(tmp_path, assets, val128_dir):
    root = small_dataset(tmp_path / "ds", val128_dir)
    shutil.rmtree(root / "labels")
    expect_no_run(tmp_path, own_data(tmp_path, root), DataError, "no labelled object")


def test_a_data_yaml_without_val(tmp_path, assets, val128_dir):
    root = small_dataset(tmp_path / "ds", val128_dir)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\ntrain: images/val\nnames: {[str(i) for i in range(80)]}\n")
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=custom", f"data.yaml={y}")
    expect_no_run(tmp_path, cfg, DataError, "has no 'val' split")


def test_a_checkpoint_for_other_classes_than_the_dataset(tmp_path, assets, val128_dir):
    root = small_dataset(tmp_path / "ds", val128_dir)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\nval: images/val\nnames: [a, b, c]\n")
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=custom", f"data.yaml={y}")
    expect_no_run(tmp_path, cfg, ConfigError, r"model.weights=.* has 80 classes but data 'custom' names 3")


def test_prune_include_matching_nothing(tmp_path, assets):
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", "sparsity=0.3",
                   "prune.include=[model.99.*]")
    expect_no_run(tmp_path, cfg, ConfigError, "prune.include pattern 'model.99.\\*' matches no Conv2d")


def test_recovery_on_a_checkpoint_saved_fused(tmp_path, assets, yolov5n_path):
    fused = tmp_path / "fused.pt"
    save_checkpoint(fuse(copy.deepcopy(load_checkpoint(yolov5n_path).model)), fused)
    cfg = make_cfg(tmp_path, "model=custom", f"model.weights={fused}", "data=coco-val128", "data.limit=4",
                   "prune.fused=false", "recover=bn", "sparsity=0.3")
    expect_no_run(tmp_path, cfg, ConfigError, "saved already fused")


def test_a_missing_weights_file(tmp_path, assets):
    cfg = make_cfg(tmp_path, "model=custom", f"model.weights={tmp_path / 'nope.pt'}", "data=coco-val128")
    expect_no_run(tmp_path, cfg, AssetError, "nope.pt")


# -- unwritable outputs and store ------------------------------------------------------------------
def _bind_read_only(src: Path, ro: Path):
    """``src`` visible read-only at ``ro`` (a bind mount: permission bits do not stop root); skips without
    mount privileges."""
    import contextlib
    import subprocess

    @contextlib.contextmanager
    def mounted():
        ro.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0
        ok = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", str(ro)], capture_output=True)
            pytest.skip("needs a read-only bind mount (mount privileges) to make a folder unwritable for root")
        try:
            yield ro
        finally:
            subprocess.run(["umount", str(ro)], capture_output=True)

    return mounted()


@pytest.fixture
def read_only(tmp_path):
    """A real read-only folder ``ro`` showing the writable folder ``src``."""
    src = tmp_path / "src"
    src.mkdir()
    with _bind_read_only(src, tmp_path / "ro") as ro:
        yield src, ro


def test_a_job_never_writes_into_the_assets_folder(tmp_path, assets):
    """The newcomer's finding: preprocessed batches and a lock file were written into $SWEEP_CACHE (the
    read-only inputs). A job with recovery (calibration images) and the batch cache on, against the real
    assets mounted read-only, must run and leave them untouched."""
    import os
    import subprocess
    import sys

    from helpers import FAST, REPO

    before = sorted((str(p.relative_to(assets)), p.stat().st_mtime_ns) for p in assets.rglob("*"))
    with _bind_read_only(assets, tmp_path / "assets-ro") as ro:
        env = os.environ | {"SWEEP_CACHE": str(ro), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        p = subprocess.run([sys.executable, "-m", "sweep", "model=yolov5n", "data=coco-val128", "data.limit=8",
                            "eval.imgsz=320", "prune.fused=false", "recover=bn", "recover.images=8", "sparsity=0.3",
                            f"paths.outputs={tmp_path / 'outputs'}", *FAST],  # paths.preprocessed: its default
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
    assert sorted((str(p.relative_to(assets)), p.stat().st_mtime_ns) for p in assets.rglob("*")) == before
    assert list((tmp_path / "xdg").rglob("*.npy")), "the decoded batches go to the per-user cache"


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_outputs_are_one_message_naming_the_folder(tmp_path, read_only, multirun):
    from helpers import run_cli

    _, ro = read_only
    out = ro / "outputs"
    p = run_cli(out, *(["-m"] if multirun else []), "model=yolov5n", "data=coco-val128", "data.limit=2",
                "sparsity=0.3")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout and p.stderr.count("error:") == 1
    assert p.stderr.startswith(f"error: paths.outputs='{out}' is not writable (Read-only file system)")


def test_a_read_only_store_is_one_message_naming_it(tmp_path, read_only):
    """Regression: a store that exists but cannot be written ended in a 217-line SQLAlchemy dump."""
    import sqlite3

    from helpers import run_cli

    src, ro = read_only
    sqlite3.connect(src / "mlflow.db").execute("create table t (x)").connection.commit()
    p = run_cli(tmp_path / "outputs", "-m", "model=yolov5n", "data=coco-val128", "data.limit=2", "sparsity=0.3",
                f"mlflow.tracking_uri=sqlite:///{ro / 'mlflow.db'}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error: mlflow.tracking_uri='sqlite:///{ro / 'mlflow.db'}': the SQLite store is not "
                               "writable ("), p.stderr
    assert "Read-only file system" in p.stderr
