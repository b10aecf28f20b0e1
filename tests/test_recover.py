"""Accuracy recovery (sweep.recover.methods): BatchNorm recalibration and its calibration data.

A freshly built yolov5n (random weights, bundled yaml) covers the recalibration mechanics fast;
synthetic image folders cover the calibration source rules; the real coco128-calib and
coco-val128 folders (``SWEEP_CACHE``) cover the real asset layout.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sweep.config.resolve import resolve_data, resolve_recover
from sweep.config.schema import Config, ConfigError
from sweep.config.spec import DataSpec, PruneSpec, RecoverSpec
from sweep.model.yolo import build_model, fuse, load_model_yaml
from sweep.prune.methods import PRUNERS
from sweep.recover import RECOVERERS, Calibration, calibration_images, recalibrate_batchnorm
from sweep.recover.calibration import eval_overlap
from sweep.recover.methods import batchnorm_layers

IMGSZ = 64


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pristine() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_model_yaml("yolov5n")).float().eval()


@pytest.fixture
def pruned(pristine) -> torch.nn.Module:
    model = copy.deepcopy(pristine)
    return PRUNERS["l1_unstructured"](model, 0.5, PruneSpec("l1_unstructured", fused=False))


def synthetic_batches(n: int = 8, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, IMGSZ, IMGSZ), generator=g, dtype=torch.uint8)
    return list(imgs.split(batch))


def calibration_of(batches: list[torch.Tensor]) -> Calibration:
    cal = Calibration([f"img{i}.jpg" for i in range(sum(len(b) for b in batches))], "synthetic", IMGSZ,
                      len(batches[0]), torch.device("cpu"))
    cal.batches = lambda: iter(batches)  # type: ignore[method-assign]
    return cal


def zeros(model: torch.nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def make_cfg(method: str = "bn", **over) -> "OmegaConf":
    cfg = OmegaConf.structured(Config)
    cfg.recover.method = method
    cfg.eval.imgsz = IMGSZ
    cfg.eval.workers = 0
    cfg.data.name = "toy"
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def write_images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        p = folder / name
        assert cv2.imwrite(str(p), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(p)
    return out


def calibration_source(cfg, eval_files: list[str], device: str) -> Calibration | None:
    """The job's path from config to calibration images: resolve the data and recover specs, then open the images."""
    c = OmegaConf.to_container(cfg, resolve=True)
    located = c["data"]["path"] or c["data"]["yaml"] or c["paths"]["cache"]
    data = (resolve_data(c, Path(c["paths"]["cache"] or ".")) if located
            else DataSpec(c["data"]["name"], Path("."), "."))
    return calibration_images(resolve_recover(c, data), c["eval"]["imgsz"], c["eval"]["workers"], eval_files, device)


def eval_data(files: list[Path]) -> list[str]:
    """The evaluated images' paths, as the session passes them."""
    return [str(f) for f in files]


# --------------------------------------------------------------------------- recoverers


def test_registry_names_and_signature():
    assert {"none", "bn"} <= set(RECOVERERS)


def test_none_is_a_noop(pruned):
    before = copy.deepcopy(pruned.state_dict())
    assert RECOVERERS["none"](pruned, RecoverSpec("none"), None) == {}
    after = pruned.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert calibration_source(make_cfg("none"), eval_data([]), "cpu") is None


def test_bn_keeps_zeros_and_parameters_changes_statistics(pruned):
    params = {k: p.detach().clone() for k, p in pruned.named_parameters()}
    n_zero = zeros(pruned)
    assert n_zero > 0
    stats = bn_buffers(pruned)
    momenta = [m.momentum for m in batchnorm_layers(pruned)]

    metrics = RECOVERERS["bn"](pruned, RecoverSpec("bn"), calibration_of(synthetic_batches()))

    assert metrics["recover_images"] == 8 and metrics["recover_seconds"] >= 0
    assert zeros(pruned) == n_zero  # pruned weights stay exactly zero
    assert all(torch.equal(params[k], p) for k, p in pruned.named_parameters())  # no parameter written
    new = bn_buffers(pruned)
    means = [k for k in stats if k.endswith("running_mean")]
    changed = [k for k in means if not torch.equal(stats[k], new[k])]
    assert len(changed) == len(means)  # every BN re-estimated
    assert all(int(new[k]) == 2 for k in new if k.endswith("num_batches_tracked"))  # reset, then 2 batches
    assert [m.momentum for m in batchnorm_layers(pruned)] == momenta  # restored
    assert not pruned.training


def test_bn_statistics_are_the_cumulative_average(pruned):
    """momentum=None: the running mean is the plain average of the per-batch means."""
    batches = synthetic_batches(n=6, batch=2)
    first = pruned.model[0].bn
    seen = []
    handle = first.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].mean((0, 2, 3))))
    try:
        recalibrate_batchnorm(pruned, batches)
    finally:
        handle.remove()
    assert len(seen) == 3
    torch.testing.assert_close(first.running_mean, torch.stack(seen).mean(0), rtol=1e-5, atol=1e-6)


def test_bn_is_deterministic(pristine):
    a, b = copy.deepcopy(pristine), copy.deepcopy(pristine)
    recalibrate_batchnorm(a, synthetic_batches())
    recalibrate_batchnorm(b, synthetic_batches())
    sa, sb = bn_buffers(a), bn_buffers(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bn_on_fused_model_is_a_clear_error(pristine):
    model = fuse(copy.deepcopy(pristine))
    with pytest.raises(ConfigError, match="prune.fused=false"):
        RECOVERERS["bn"](model, RecoverSpec("bn"), calibration_of(synthetic_batches()))


def test_bn_without_calibration_is_a_clear_error(pruned):
    with pytest.raises(ConfigError, match="recover.data"):
        RECOVERERS["bn"](pruned, RecoverSpec("bn"), None)


# --------------------------------------------------------------------------- calibration data


def test_calibration_order_count_and_shape(tmp_path):
    names = [f"{i:03d}.jpg" for i in (5, 1, 9, 3, 7, 2)]
    write_images(tmp_path / "calib", names)
    cfg = make_cfg(**{"recover.data": str(tmp_path / "calib"), "recover.images": 4, "recover.batch": 3})
    cal = calibration_source(cfg, eval_data([]), "cpu")
    assert [Path(f).name for f in cal.files] == ["001.jpg", "002.jpg", "003.jpg", "005.jpg"]
    shapes = [tuple(b.shape) for b in cal.batches()]
    assert shapes == [(3, 3, IMGSZ, IMGSZ), (1, 3, IMGSZ, IMGSZ)]
    again = calibration_source(cfg, eval_data([]), "cpu")
    assert again.files == cal.files
    assert all(torch.equal(x, y) for x, y in zip(cal.batches(), again.batches()))


def test_calibration_default_is_data_train_relative_to_data_path(tmp_path):
    write_images(tmp_path / "ds" / "images" / "train", ["a.jpg", "b.jpg"])
    write_images(tmp_path / "ds" / "images" / "val2017", ["v.jpg"])
    cfg = make_cfg(**{"data.path": str(tmp_path / "ds"), "data.train": "images/train"})
    cal = calibration_source(cfg, eval_data([]), "cpu")
    assert [Path(f).name for f in cal.files] == ["a.jpg", "b.jpg"]


def test_calibration_from_dataset_yaml_uses_train_split(tmp_path):
    write_images(tmp_path / "ds" / "images" / "train", ["a.jpg"])
    write_images(tmp_path / "ds" / "images" / "val", ["v.jpg"])
    y = tmp_path / "ds" / "data.yaml"
    y.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    cal = calibration_source(make_cfg(**{"recover.data": str(y)}), eval_data([]), "cpu")
    assert [Path(f).name for f in cal.files] == ["a.jpg"]


def test_no_calibration_source_is_a_config_error():
    with pytest.raises(ConfigError, match="recover.data"):
        calibration_source(make_cfg(), eval_data([]), "cpu")


def test_empty_calibration_folder_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="recover.data"):
        calibration_source(make_cfg(**{"recover.data": str(tmp_path / "empty")}), eval_data([]), "cpu")


def test_calibrating_on_evaluation_images_is_refused(tmp_path):
    val = write_images(tmp_path / "val", ["x.jpg", "y.jpg"], seed=1)
    cfg = make_cfg(**{"recover.data": str(tmp_path / "val")})
    with pytest.raises(ConfigError, match="allow_eval_images"):
        calibration_source(cfg, eval_data(val), "cpu")
    cfg.recover.allow_eval_images = True
    assert len(calibration_source(cfg, eval_data(val), "cpu")) == 2


def test_copied_or_renamed_evaluation_images_are_refused(tmp_path):
    val = write_images(tmp_path / "val", ["x.jpg", "y.jpg"], seed=1)
    write_images(tmp_path / "calib", ["c1.jpg"], seed=2)
    shutil.copy(val[1], tmp_path / "calib" / "renamed.jpg")  # same content, other name
    cfg = make_cfg(**{"recover.data": str(tmp_path / "calib")})
    with pytest.raises(ConfigError, match="renamed.jpg"):
        calibration_source(cfg, eval_data(val), "cpu")
    assert eval_overlap([str(tmp_path / "calib" / "c1.jpg")], [str(v) for v in val]) == []


# --------------------------------------------------------------------------- real assets


@pytest.fixture(scope="module")
def calib_dir(assets: Path) -> Path:
    d = assets / "datasets" / "coco128-calib" / "images" / "train2017"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d


def real_cfg(assets: Path, **over):
    data_yaml = Path(__file__).resolve().parents[1] / "conf" / "data" / "coco-val128.yaml"
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"data": OmegaConf.load(data_yaml)})
    cfg.paths.cache = str(assets)
    cfg.recover.method = "bn"
    cfg.eval.workers = 0
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.mark.assets
def test_real_default_calibration_is_coco128_disjoint_from_val(assets, calib_dir, val128_dir):
    from sweep.data.dataset import list_image_files

    cfg = real_cfg(assets, **{"eval.imgsz": 320})
    val = eval_data([Path(f) for f in list_image_files(val128_dir / "images" / "val2017")])
    cal = calibration_source(cfg, val, "cpu")
    assert len(cal) == 128 and cal.files == sorted(cal.files)
    assert Path(cal.files[0]).parent.resolve() == (assets / "datasets" / "coco128" / "images" / "train2017").resolve()
    assert [Path(f).name for f in cal.files] == sorted(p.name for p in calib_dir.glob("*.jpg"))  # coco128-calib's
    cfg.recover.data = str(val128_dir / "images" / "val2017")
    with pytest.raises(ConfigError, match="also evaluation images"):
        calibration_source(cfg, val, "cpu")


@pytest.mark.assets
@pytest.mark.slow
def test_real_yolov5n_bn_recalibration_keeps_zeros(assets, yolov5n_path, val128_dir):
    checkpoint = pytest.importorskip("sweep.model.checkpoint")
    from sweep.data.dataset import list_image_files

    model = checkpoint.load_checkpoint(yolov5n_path).model.float().eval()
    PRUNERS["l1_unstructured"](model, 0.5, PruneSpec("l1_unstructured", fused=False))
    n_zero = zeros(model)
    stats = bn_buffers(model)
    cfg = real_cfg(assets, **{"eval.imgsz": 320, "recover.images": 16, "recover.batch": 8})
    val = eval_data([Path(f) for f in list_image_files(val128_dir / "images" / "val2017")])
    metrics = RECOVERERS["bn"](model, RecoverSpec("bn"), calibration_source(cfg, val, "cpu"))
    assert metrics["recover_images"] == 16
    assert zeros(model) == n_zero
    new = bn_buffers(model)
    assert all(not torch.equal(stats[k], new[k]) for k in stats if k.endswith("running_var"))


# --------------------------------------------------------------------------- recover=finetune, as a job


FINETUNE = ("model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320", "prune.fused=false",
            "recover=finetune", "recover.images=8", "recover.data_limit=8", "recover.batch=4", "sparsity=0.3")


@pytest.mark.assets
def test_finetune_job_keeps_zeros_logs_curves_and_hashes_its_budget(tmp_path, assets):
    from helpers import make_cfg, runs
    from mlflow.tracking import MlflowClient

    from sweep.config.resolve import resolve_job
    from sweep.job import JobContext, run_job
    from sweep.memo import ProcessMemo

    memo = ProcessMemo()
    cfg = make_cfg(tmp_path, *FINETUNE, "recover.hyp.lr0=0.002")
    out = run_job(cfg, JobContext(tmp_path / "job"), memo)
    m = out.metrics
    assert out.status == "done" and m["recover_method"] == "finetune"
    assert m["sparsity"] == pytest.approx(0.3, abs=1e-6)  # pruned weights stayed exactly zero through training
    assert m["recalibrate_images"] == 8 and m["recover_images"] == 8 and m["recover_steps"] >= 1
    [run] = runs(tmp_path)
    assert run.info.run_name == "yolov5n-l1_unstructured-unfused-finetune-s0.30"
    assert run.data.params["recover.hyp.lr0"] == "0.002" and run.data.params["recover.epochs"] == "1"
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id, "train_loss")
    assert [h.step for h in history] == list(range(len(m["train_loss"]))) and len(history) == 2  # 8 images / 4
    # the budget and every hyperparameter are part of the config hash (resume stays exact); bn's hash ignores them
    hashes = {resolve_job(make_cfg(tmp_path, *FINETUNE, *o), memo).config_hash
              for o in ((), ("recover.epochs=3",), ("recover.hyp.lr0=0.002",))}
    assert len(hashes) == 3
    bn = ("model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320", "prune.fused=false", "recover=bn",
          "recover.images=8", "sparsity=0.3")
    assert resolve_job(make_cfg(tmp_path, *bn), memo).config_hash == \
        resolve_job(make_cfg(tmp_path, *bn, "recover.epochs=3", "recover.hyp.lr0=0.002"), memo).config_hash


@pytest.mark.assets
@pytest.mark.parametrize("overrides,error,match", [
    (("prune.fused=true",), ConfigError, "prune.fused=true is not allowed"),
    (("+recover.hyp.lr9=1",), ConfigError, "recover.hyp.lr9=1.0 is unknown: allowed are YOLOv5.s hyp.scratch-low keys"),
    (("recover.epochs=0",), ConfigError, "recover.epochs=0"),
    (("recover.data=calib",), ConfigError, "has no labels"),
    (("recover.data=val",), ConfigError, "also evaluation images"),
])
def test_finetune_bad_inputs_fail_before_any_run(tmp_path, assets, val128_dir, overrides, error, match):
    from helpers import make_cfg, runs

    from sweep.job import JobContext, run_job

    places = {"calib": str(assets / "datasets" / "coco128-calib" / "images" / "train2017"),
              "val": str(val128_dir / "images" / "val2017")}
    overrides = tuple(o.replace("=calib", f"={places['calib']}").replace("=val", f"={places['val']}")
                      if o.startswith("recover.data=") else o for o in overrides)
    cfg = make_cfg(tmp_path, *FINETUNE, *overrides)
    with pytest.raises(error, match=match):
        run_job(cfg, JobContext(tmp_path / "job"))
    assert runs(tmp_path) == [] and not (tmp_path / "job").exists()


def test_finetuned_weights_are_rounded_as_a_yolov5_checkpoint_holds_them():
    """train.py saves the EMA as FP16 and val.py evaluates that file: every float parameter and buffer is
    rounded to FP16 (and back), zeros stay zero, integer buffers are untouched."""
    from torch import nn

    from sweep.recover.methods import round_to_half

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        m[0].weight[0] = 0.0
        m[1].running_var.add_(torch.rand(4) * 1e-3 + 1 / 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    round_to_half(m)
    for k, v in m.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, before[k].half().float()), k
            assert v.dtype == torch.float32
        else:
            assert torch.equal(v, before[k]), k  # num_batches_tracked
    assert (m[0].weight[0] == 0).all()
    assert not torch.equal(m[1].running_var, before["1.running_var"])  # 1/3 is not an FP16 number


def test_finetune_recovery_returns_the_weights_a_yolov5_checkpoint_would_hold(pruned):
    """recover=finetune ends on FP16-rounded weights (the helper above, called by the recoverer)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, IMGSZ, IMGSZ), generator=g, dtype=torch.uint8)
    labels = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [1, 7, 0.7, 0.6, 0.5, 0.4]])
    cal = calibration_of(synthetic_batches(n=2, batch=2))
    cal.train = lambda epoch: [(images, labels)]
    metrics = RECOVERERS["finetune"](pruned, RecoverSpec("finetune", batch=2, iters=1), cal)
    assert metrics["recover_steps"] == 1
    for name, t in [*pruned.named_parameters(), *pruned.named_buffers()]:
        if t.is_floating_point():
            assert torch.equal(t, t.half().float()), name


def test_recalibration_runs_without_tf32_and_restores_the_flag():
    """On CUDA, cuDNN's TF32 default would round the convolutions' inputs during recalibration; it is off
    for the passes (checked from inside the forward) and the caller's setting comes back afterwards."""
    from torch import nn

    from sweep.recover.methods import recalibrate_batchnorm

    seen_flags = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.register_forward_hook(lambda *_: seen_flags.append(torch.backends.cudnn.allow_tf32))
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        recalibrate_batchnorm(model, [torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)])
        assert seen_flags == [False] and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
