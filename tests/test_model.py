"""YOLOv5 model building, decoding and fusion (sweep/model/yolo.py, sweep/model/blocks.py)."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from sweep.model.checkpoint import load_checkpoint
from sweep.model.yolo import (MODULES, Conv, Detect, ModelError, build_model, count_params, fuse,
                         is_fused, load_model_yaml, make_divisible)

# Parameter counts for nc=80: unfused (as built/trained) and after fuse() (what YOLOv5's
# val.py and README report, e.g. "YOLOv5s summary: 157 layers, 7225885 parameters").
PARAMS = {
    "yolov5n": (1_872_157, 1_867_405),
    "yolov5s": (7_235_389, 7_225_885),
    "yolov5m": (21_190_557, 21_172_173),
    "yolov5l": (46_563_709, 46_533_693),
    "yolov5x": (86_749_405, 86_705_005),
}

# YOLOv5 v5.0 yolov5s: Focus stem and SPP (architecture data, for the legacy modules).
V5_0_S = {
    "nc": 80, "depth_multiple": 0.33, "width_multiple": 0.50,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 9, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "SPP", [1024, [5, 9, 13]]],
                 [-1, 3, "C3", [1024, False]]],
    "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
             [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]],
             [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
             [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]], [[-1, 14], 1, "Concat", [1]],
             [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]], [[-1, 10], 1, "Concat", [1]],
             [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]],
}


def tiny_yaml(nc: int = 3, **extra) -> dict:
    """A small 2-level detector using every legacy module (Focus, SPP, BottleneckCSP)."""
    return {
        "nc": nc, "depth_multiple": 0.33, "width_multiple": 0.125,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
        "backbone": [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]],
                     [-1, 3, "BottleneckCSP", [128]], [-1, 1, "Conv", [256, 3, 2]],
                     [-1, 1, "SPP", [256, [5, 9, 13]]], [-1, 1, "SPPF", [256, 5]]],
        "head": [[-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 2], 1, "Concat", [1]],
                 [-1, 1, "C3", [128, False]], [[8, 5], 1, "Detect", ["nc", "anchors"]]],
        **extra,
    }


def real_image(val128_dir, size=(640, 480)) -> torch.Tensor:
    """First coco-val128 image resized to W x H, as [1, 3, H, W] RGB float in [0, 1]."""
    path = sorted((val128_dir / "images" / "val2017").glob("*.jpg"))[0]
    bgr = cv2.resize(cv2.imread(str(path)), size, interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)[None].float() / 255


def test_make_divisible():
    assert make_divisible(64 * 0.25) == 16
    assert make_divisible(1024 * 0.75) == 768
    assert make_divisible(20) == 24


@pytest.fixture(scope="module")
def yolov5n_fresh():
    """A randomly initialised yolov5n (built once; deepcopy before changing it)."""
    return build_model(load_model_yaml("yolov5n"))


@pytest.mark.parametrize("name", [
    "yolov5n", "yolov5s", pytest.param("yolov5m", marks=pytest.mark.slow),
    pytest.param("yolov5l", marks=pytest.mark.slow), pytest.param("yolov5x", marks=pytest.mark.slow),
])
def test_bundled_yaml_param_counts(name):
    model = build_model(load_model_yaml(name))
    unfused, fused = PARAMS[name]
    assert count_params(model) == unfused
    assert count_params(fuse(model)) == fused
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_official_names_and_layer_attributes(yolov5n_fresh):
    model = yolov5n_fresh
    keys = model.state_dict().keys()
    for key in ("model.0.conv.weight", "model.0.bn.running_var", "model.2.m.0.cv1.conv.weight",
                "model.24.m.0.weight", "model.24.m.2.bias", "model.24.anchors"):
        assert key in keys
    assert "model.24.stride" not in keys  # not persistent: official files have no such entry
    assert model.save == [4, 6, 10, 14, 17, 20, 23]
    assert [layer.i for layer in model.model] == list(range(25))
    assert model.model[24].f == [17, 20, 23] and model.model[24].type == "Detect"
    assert model.model[11].type == "nn.Upsample"
    bn = model.model[0].bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    # anchors are stored in stride units, as in the checkpoints
    assert model.model[24].anchors[0, 0].tolist() == [10 / 8, 13 / 8]
    assert model.model[24].anchors[2, 2].tolist() == [373 / 32, 326 / 32]


def test_build_leaves_batchnorm_statistics_untouched(yolov5n_fresh):
    model = yolov5n_fresh
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert int(m.num_batches_tracked) == 0
    assert not model.training


def test_forward_shapes_eval_and_train():
    model = build_model(load_model_yaml("yolov5n"), nc=7)
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        pred, raw = model(x)
    n = sum(3 * (96 // s) * (160 // s) for s in (8, 16, 32))
    assert pred.shape == (2, n, 12)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 96 // s, 160 // s, 12) for s in (8, 16, 32)]
    assert pred[..., 4:].min() >= 0 and pred[..., 4:].max() <= 1
    model.train()
    out = model(x)
    assert isinstance(out, list) and [tuple(r.shape) for r in out] == [tuple(r.shape) for r in raw]


def test_decode_formula_and_row_order(yolov5n_fresh):
    """pred row for (level, anchor, y, x) follows xy=(2s-0.5+grid)*stride, wh=(2s)^2*anchor."""
    model = copy.deepcopy(yolov5n_fresh)
    detect: Detect = model.model[-1]
    with torch.no_grad():
        detect.anchors.mul_(1.3)  # anchors that differ per level and anchor
        pred, raw = model(torch.rand(1, 3, 64, 96))
    sizes = [(r.shape[2], r.shape[3]) for r in raw]
    level, a, y, x = 1, 2, 3, 4
    row = sum(3 * h * w for h, w in sizes[:level]) + (a * sizes[level][0] + y) * sizes[level][1] + x
    s = raw[level][0, a, y, x].sigmoid()
    stride = detect.stride[level]
    expect_xy = (2 * s[:2] - 0.5 + torch.tensor([x, y])) * stride
    expect_wh = (2 * s[2:4]) ** 2 * detect.anchors[level, a] * stride
    torch.testing.assert_close(pred[0, row, :2], expect_xy)
    torch.testing.assert_close(pred[0, row, 2:4], expect_wh)
    torch.testing.assert_close(pred[0, row, 4:], s[4:])


def test_custom_nc_and_yaml_untouched():
    yaml = load_model_yaml("yolov5n")
    model = build_model(yaml, nc=3)
    assert model.yaml["nc"] == 3 and yaml["nc"] == 80
    assert model.model[-1].m[0].out_channels == 3 * (5 + 3)
    assert model.names == ["0", "1", "2"]


def test_legacy_modules_build_run_and_fuse():
    model = build_model(tiny_yaml())
    assert {layer.type for layer in model.model} >= {"Focus", "BottleneckCSP", "SPP", "SPPF", "C3"}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before, _ = model(x)
        after, _ = fuse(model)(x)
    assert is_fused(model)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_v5_0_yolov5s_param_count():
    """The v5.0 architecture (Focus + SPP) with the published v5.0 yolov5s size."""
    model = build_model(V5_0_S)
    assert count_params(model) == 7_276_605


def test_yaml_activation_key():
    model = build_model(tiny_yaml(activation="nn.LeakyReLU(0.1)"))
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)
    with pytest.raises(ModelError, match="activation"):
        build_model(tiny_yaml(activation="__import__('os').system('true')"))


def test_unknown_modules_and_strings_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    yaml = tiny_yaml()
    yaml["backbone"][1] = [-1, 1, evil, [128, 3, 2]]
    with pytest.raises(ModelError, match="not supported"):
        build_model(yaml)
    yaml = tiny_yaml()
    yaml["backbone"][1] = [-1, 1, "Conv", [evil, 3, 2]]
    with pytest.raises(ModelError, match="layer 1"):
        build_model(yaml)
    assert not marker.exists()
    assert "eval" not in MODULES and all(isinstance(k, str) for k in MODULES)


def test_fuse_removes_bn_and_keeps_outputs(yolov5n_fresh):
    model = copy.deepcopy(yolov5n_fresh)
    with torch.no_grad():  # non-trivial BN statistics so the folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        _, raw0 = model(x)
        fused = fuse(copy.deepcopy(model))
        _, raw1 = fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.conv.bias is not None for m in fused.modules() if isinstance(m, Conv))
    for a, b in zip(raw0, raw1):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.assets
def test_fused_matches_unfused_on_real_image(yolov5n_path, val128_dir):
    """Fusion changes the FP32 network outputs by < 1e-3.

    Raw outputs (logits) and the decoded probabilities agree to < 1e-3. Decoded boxes are in
    pixels (values up to ~640): there FP32 rounding alone is ~2e-3 px (the unfused FP32 model
    differs from an FP64 evaluation of itself by that much), so boxes are compared relative
    to the image size.
    """
    model = load_checkpoint(yolov5n_path).model
    x = real_image(val128_dir)
    with torch.no_grad():
        pred0, raw0 = model(x)
        fused = fuse(copy.deepcopy(model))
        pred1, raw1 = fused(x)
    assert count_params(fused) == 1_867_405
    raw_diff = max((a - b).abs().max().item() for a, b in zip(raw0, raw1))
    assert raw_diff < 1e-3
    assert (pred0[..., 4:] - pred1[..., 4:]).abs().max().item() < 1e-3
    assert ((pred0[..., :4] - pred1[..., :4]) / max(x.shape[-2:])).abs().max().item() < 1e-3
    assert (pred0[..., :4] - pred1[..., :4]).abs().max().item() < 1e-2  # pixels
    assert pred0[0, :, 4].max() > 0.5  # the model sees something in a real image


def test_bad_yaml_values():
    with pytest.raises(ModelError, match="nc=0"):
        build_model(tiny_yaml(), nc=0)
    with pytest.raises(ModelError, match="'head'"):
        build_model({k: v for k, v in tiny_yaml().items() if k != "head"})
    with pytest.raises(ModelError, match="no model yaml"):
        load_model_yaml("yolov9000")


@pytest.mark.assets
def test_fusion_folds_in_fp32_with_val_py_formula_bit_for_bit(yolov5n_path):
    """val.py fuses the FP32 model with ``diag(gamma / sqrt(eps + var)) @ W`` and
    ``beta - gamma * mean / sqrt(var + eps)``: every fused weight and bias equals that FP32 arithmetic
    exactly (stated here elementwise, independently of the matrix product), which float64 folding did not."""
    model = load_checkpoint(yolov5n_path).model.float()
    pairs = [(m.conv.weight.detach().clone(), m.bn) for m in model.modules() if isinstance(m, Conv)]
    fused = fuse(copy.deepcopy(model))
    convs = [m.conv for m in fused.modules() if isinstance(m, Conv)]
    assert len(convs) == len(pairs) == 57
    off64 = 0
    for (w, bn), conv in zip(pairs, convs):
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        assert conv.weight.dtype == torch.float32
        assert torch.equal(conv.weight, w * scale.view(-1, 1, 1, 1))
        shift = bn.bias.detach() - bn.weight.detach() * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        assert torch.equal(conv.bias, shift)
        scale64 = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        off64 += int((conv.weight != (w.double() * scale64.view(-1, 1, 1, 1)).float()).sum())
    assert off64 > 1000  # the float64 fold gives other last bits: this test tells the two apart
