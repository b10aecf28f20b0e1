"""The real YOLOv5n-sized variant checkpoint yolov5n-7-k5.pt (C3x, CrossConv, stride-2 5x5 DWConv,
DWConvTranspose2d upsampling): loads strictly, evaluates as YOLOv5's val.py does, prunes.

Reference (../shared/REFERENCE-FIGURES.md, YOLOv5's own val.py, coco-val128, 640, FP32 CPU):
0.3726 / 0.5538 / 0.5570 (mAP50-95 / mAP50 / AR100); the pinned values below come from running
this code and equal them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from sweep.model import fuse, is_fused, load_checkpoint, save_checkpoint
from sweep.model.blocks import C3x, CrossConv, DWConv, DWConvTranspose2d
from sweep.model.checkpoint import allowed_globals, scan_globals
from sweep.model.yolo import count_params

K5_SHA256 = "214374c1e7dd79c23f8f4633eac17e4203a080913a4d91c787d6eca17d32b0c9"


@pytest.fixture(scope="module")
def k5_path(assets: Path) -> Path:
    path = assets / "weights" / "yolov5n-7-k5.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def k5(k5_path):
    return load_checkpoint(k5_path)


def evaluate_val128(model: nn.Module, names: list[str], stride: int, val128_dir: Path, imgsz: int = 640,
                    limit: int | None = None) -> dict[str, float]:
    """The 12 COCO numbers of ``model`` (fused, FP32, CPU) on coco-val128 with val.py's settings
    (rect batches of 32, conf 0.001, iou 0.65, max_det 300, pycocotools)."""
    from sweep.data import Dataset, load_ground_truth
    from sweep.evaluate.coco import CocoEvaluator
    from sweep.evaluate.loop import run_inference

    ds = Dataset(val128_dir / "images" / "val2017", names=names, imgsz=imgsz, batch=32, stride=stride, limit=limit)
    gt, _ = load_ground_truth(ds)
    evaluator = CocoEvaluator(gt, backend="pycocotools", image_ids=ds.image_ids, class_map=ds.class_map)
    with torch.inference_mode():
        run_inference(model, ds.iter_batches(), evaluator, device=torch.device("cpu"), half=False, conf=0.001,
                      iou=0.65, max_det=300)
    return evaluator.evaluate().stats


@pytest.mark.assets
def test_k5_loads_strictly_with_its_modules(k5, k5_path):
    model = k5.model
    assert k5.sha256 == K5_SHA256
    assert set(scan_globals(k5_path)) <= allowed_globals()
    assert count_params(model) == 1_503_565
    assert k5.stride.tolist() == [8.0, 16.0, 32.0] and len(k5.names) == 80
    layers = model.model
    assert isinstance(layers[2], C3x) and isinstance(layers[2].m[0], CrossConv)
    assert isinstance(layers[11], DWConvTranspose2d) and layers[11].groups == 128
    assert tuple(layers[11].weight.shape) == (128, 1, 4, 4) and layers[11].bias is not None
    assert isinstance(layers[21], DWConv) and layers[21].conv.groups == 128
    assert layers[21].conv.kernel_size == (5, 5) and layers[21].conv.stride == (2, 2)
    assert layers[2].m[0].cv1.conv.kernel_size == (1, 3) and layers[2].m[0].cv2.conv.kernel_size == (3, 1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the transposed conv doubles the map exactly: (H - 1) * 2 - 2 + 4 = 2H
    with torch.no_grad():
        assert layers[11](torch.zeros(1, 128, 5, 7)).shape == (1, 128, 10, 14)


@pytest.mark.assets
def test_k5_fuses_every_conv_and_keeps_outputs(k5):
    model = copy.deepcopy(k5.model)
    x = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        _, raw0 = model(x)
        _, raw1 = fuse(model)(x)
    assert is_fused(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert max((a - b).abs().max().item() for a, b in zip(raw0, raw1)) < 1e-3


@pytest.mark.assets
def test_k5_save_round_trip(k5, tmp_path):
    path = save_checkpoint(fuse(copy.deepcopy(k5.model)), tmp_path / "k5-fused.pt")
    loaded = load_checkpoint(path).model
    assert isinstance(loaded.model[11], DWConvTranspose2d) and is_fused(loaded)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], fuse(copy.deepcopy(k5.model))(x)[0])


@pytest.mark.slow
@pytest.mark.assets
def test_k5_dense_accuracy_is_val_py_s(k5, val128_dir):
    """Pinned from running this code; equal to YOLOv5's val.py figures for this checkpoint."""
    stats = evaluate_val128(fuse(copy.deepcopy(k5.model)), k5.names, int(k5.stride.max()), val128_dir)
    assert round(stats["mAP50-95"], 4) == 0.3726
    assert round(stats["mAP50"], 4) == 0.5538
    assert round(stats["AR100"], 4) == 0.5570
