"""Every YOLOv5 architecture a user may have: the bundled P5/P6 yamls, the model-zoo variants
(tests/data/models: P2/P6/P7 heads, FPN, PANet, BiFPN, Ghost, Transformer, LeakyReLU, YOLOv3
family) and one network using every module of YOLOv5's yaml parser. Each builds, has that
architecture's parameter names and shapes, and round-trips through the safe loader strictly as
a checkpoint pickled the way YOLOv5 pickles (release v6.x / v7.0, train.py's last.pt, FP16 / FP32).

Parameter counts come from running this code; the published ones agree where they exist
(YOLOv5n6..x6: 3.2 / 12.6 / 35.7 / 76.8 / 140.7 M, YOLOv3 61.9 M, YOLOv3-SPP 63.0 M,
YOLOv3-tiny 8.8 M, the PANet yaml = YOLOv5l 46.5 M).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from yolov5_pickle import fake_yolov5_package, official_style, release_checkpoint, training_checkpoint

from sweep.model import CheckpointError, fuse, is_fused, load_checkpoint, save_checkpoint
from sweep.model import blocks as B
from sweep.model.checkpoint import scan_globals
from sweep.model.yolo import MODULES, ModelError, build_model, count_params, load_model_yaml

DATA = Path(__file__).parent / "data" / "models"

# name -> (unfused params, fused params, strides) at nc=80
ARCHS = {
    "yolov5n": (1_872_157, 1_867_405, [8, 16, 32]),
    "yolov5s": (7_235_389, 7_225_885, [8, 16, 32]),
    "yolov5m": (21_190_557, 21_172_173, [8, 16, 32]),
    "yolov5l": (46_563_709, 46_533_693, [8, 16, 32]),
    "yolov5x": (86_749_405, 86_705_005, [8, 16, 32]),
    "yolov5n6": (3_246_940, 3_239_884, [8, 16, 32, 64]),
    "yolov5s6": (12_626_620, 12_612_508, [8, 16, 32, 64]),
    "yolov5m6": (35_731_932, 35_704_908, [8, 16, 32, 64]),
    "yolov5l6": (76_770_172, 76_726_332, [8, 16, 32, 64]),
    "yolov5x6": (140_794_780, 140_730_220, [8, 16, 32, 64]),
    "yolov5-p2": (47_493_372, 47_461_436, [4, 8, 16, 32]),
    "yolov5-p34": (5_331_518, 5_323_806, [8, 16]),
    "yolov5-p6": (76_770_172, 76_726_332, [8, 16, 32, 64]),
    "yolov5-p7": (144_281_723, 144_216_251, [8, 16, 32, 64, 128]),
    "yolov5-fpn": (41_117_565, 41_090_877, [8, 16, 32]),
    "yolov5-panet": (46_563_709, 46_533_693, [8, 16, 32]),
    "yolov5-bifpn": (46_825_853, 46_795_837, [8, 16, 32]),
    "yolov5s-ghost": (3_897_605, 3_888_789, [8, 16, 32]),
    "yolov5s-transformer": (7_235_645, 7_226_653, [8, 16, 32]),
    "yolov5s-LeakyReLU": (7_235_389, 7_225_885, [8, 16, 32]),
    "yolov3": (61_949_149, 61_922_845, [8, 16, 32]),
    "yolov3-spp": (62_998_749, 62_971_933, [8, 16, 32]),
    "yolov3-tiny": (8_852_366, 8_849_182, [16, 32]),
    "all-modules": (2_084_025, 2_079_665, [8, 16, 32]),
    "prunable-modules": (1_596_537, 1_592_817, [8, 16, 32]),
}


def arch_yaml(name: str) -> dict:
    path = DATA / f"{name}.yaml"
    return load_model_yaml(path if path.is_file() else name)


def small(yaml: dict) -> dict:
    """The same architecture (same layer and parameter names) at a width that builds in a blink."""
    return {**yaml, "width_multiple": min(float(yaml["width_multiple"]), 0.125)}


def test_every_zoo_yaml_is_listed():
    bundled = {p.stem for p in Path(load_model_yaml.__globals__["model_yaml_path"]("x").parent).glob("*.yaml")}
    assert {p.stem for p in DATA.glob("*.yaml")} | bundled == set(ARCHS)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_architecture_sizes_and_strides(name):
    """Built on the meta device (no memory), so even YOLOv5x6 / P7 are instant."""
    unfused, fused, strides = ARCHS[name]
    model = build_model(arch_yaml(name), device="meta")
    assert count_params(model) == unfused
    assert model.stride_values == [float(s) for s in strides]
    detect = model.model[-1]
    assert detect.anchors.shape == (len(strides), 3, 2)
    bn_params = sum(m.weight.numel() * 2 for m in model.modules()
                    if isinstance(m, nn.BatchNorm2d) and any(m is c.bn for c in model.modules()
                                                             if isinstance(c, B.Conv) and "bn" in c._modules))
    conv_biases = sum(c.conv.out_channels for c in model.modules() if isinstance(c, B.Conv))
    assert unfused - bn_params + conv_biases == fused  # fusion: BN (2 per channel) -> one bias per channel


@pytest.mark.parametrize("name", ["yolov5n6", "yolov5s-ghost", "yolov5s-transformer", "yolov5s-LeakyReLU",
                                  "yolov3-tiny", "yolov5-p34", "all-modules", "prunable-modules"])
def test_real_build_runs_and_fuses(name):
    model = build_model(small(arch_yaml(name)) if name.startswith("yolov5s") else arch_yaml(name))
    x = torch.rand(1, 3, 128, 192)
    with torch.no_grad():
        pred, raw = model(x)
        pred_fused, _ = fuse(copy.deepcopy(model))(x)
    strides = ARCHS[name][2]
    assert [tuple(r.shape[2:4]) for r in raw] == [(128 // s, 192 // s) for s in strides]
    assert pred.shape == (1, sum(3 * (128 // s) * (192 // s) for s in strides), 85)
    torch.testing.assert_close(pred_fused, pred, atol=2e-3, rtol=1e-3)


def test_official_parameter_names_and_shapes():
    """Spot checks of names and shapes a checkpoint of each architecture has."""
    sd = {k: tuple(v.shape) for k, v in build_model(arch_yaml("yolov5n6"), device="meta").state_dict().items()}
    assert sd["model.33.anchors"] == (4, 3, 2) and sd["model.33.m.3.weight"] == (255, 256, 1, 1)
    assert sd["model.9.conv.weight"] == (256, 192, 3, 3) and sd["model.11.cv2.conv.weight"] == (256, 512, 1, 1)
    sd = {k: tuple(v.shape) for k, v in build_model(arch_yaml("yolov5s-ghost"), device="meta").state_dict().items()}
    assert sd["model.1.cv1.conv.weight"] == (32, 32, 3, 3) and sd["model.1.cv2.conv.weight"] == (32, 1, 5, 5)
    assert sd["model.2.m.0.conv.0.cv2.conv.weight"] == (8, 1, 5, 5)  # c2=32 -> bottleneck 16 -> ghost halves 8
    assert sd["model.2.m.0.conv.2.cv1.conv.weight"] == (16, 16, 1, 1)
    sd = {k: tuple(v.shape) for k, v in build_model(arch_yaml("yolov5s-transformer"), device="meta").state_dict().items()}
    assert sd["model.8.m.linear.weight"] == (256, 256) and sd["model.8.m.linear.bias"] == (256,)
    assert sd["model.8.m.tr.0.ma.in_proj_weight"] == (768, 256) and sd["model.8.m.tr.0.ma.out_proj.bias"] == (256,)
    assert sd["model.8.m.tr.0.q.weight"] == (256, 256) and "model.8.m.tr.0.q.bias" not in sd
    sd = {k: tuple(v.shape) for k, v in build_model(arch_yaml("all-modules"), device="meta").state_dict().items()}
    # MixConv2d(64, 64, k=(1, 3, 5)): outputs split 22/21/21, each conv grouped by gcd(64, its outputs)
    assert [sd[f"model.6.m.{i}.weight"] for i in range(3)] == [(22, 32, 1, 1), (21, 64, 3, 3), (21, 64, 5, 5)]
    assert sd["model.4.cv2.weight"] == (32, 64, 1, 1) and sd["model.4.bn.running_var"] == (64,)  # BottleneckCSP
    assert sd["model.16.weight"] == (128, 1, 4, 4) and sd["model.19.weight"] == (128, 64, 2, 2)  # transposed
    assert sd["model.5.weight"] == (64,) and sd["model.3.shortcut.0.conv.weight"] == (32, 1, 3, 3)
    assert sd["model.12.m.cv1.conv.weight"] == (64, 128, 1, 1)  # C3SPP's inner SPP
    assert sd["model.8.conv.weight"] == (128, 1, 5, 5)  # DWConv(64 -> 128): groups = gcd = 64


def test_activation_key_reaches_every_conv_and_only_convs():
    model = build_model(small(arch_yaml("yolov5s-LeakyReLU")))
    acts = [m.act for m in model.modules() if isinstance(m, B.Conv)]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)
    model = build_model(arch_yaml("all-modules"))  # nn.Hardswish(); GhostBottleneck's act=False convs stay linear
    ghost = model.model[3]
    assert isinstance(ghost.conv[0].cv1.act, nn.Hardswish) and isinstance(ghost.conv[2].cv1.act, nn.Identity)
    assert isinstance(model.model[4].act, nn.SiLU)  # BottleneckCSP's own act is not a Conv's: SiLU as in YOLOv5
    for bad in ("nn.ReLU(", "nn.Softmax()", "nn.SiLU(1)", "os.system('x')", "nn.LeakyReLU(__import__('os'))"):
        with pytest.raises(ModelError, match="activation"):
            build_model({**arch_yaml("yolov5-p34"), "activation": bad}, device="meta")


def test_parser_channel_rules():
    """c2 of output-sized convs is not scaled; BatchNorm2d takes c1; Contract/Expand scale channels."""
    yaml = {"nc": 2, "depth_multiple": 1.0, "width_multiple": 0.5, "anchors": 1,
            "backbone": [[-1, 1, "Conv", [7, 3, 2]],  # 7 = na * (nc + 5): a detection output, kept
                         [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Contract", [2]], [-1, 1, "nn.BatchNorm2d", []],
                         [-1, 1, "Expand", [2]], [-1, 2, "Bottleneck", [64]], [-1, 2, "C3", [64]]],
            "head": [[[-1, 1], 1, "Concat", [1]], [-1, 1, "Conv", [32, 3, 2]], [[-1], 1, "Detect", ["nc", "anchors"]]]}
    model = build_model(yaml, device="meta")
    layers = model.model
    assert layers[0].conv.out_channels == 7 and layers[1].conv.out_channels == 32
    assert layers[3].num_features == 128 and layers[5][0].cv1.conv.in_channels == 32
    assert isinstance(layers[5], nn.Sequential) and len(layers[5]) == 2  # Bottleneck repeated outside
    assert isinstance(layers[6], B.C3) and len(layers[6].m) == 2  # C3 repeats inside
    assert layers[8].conv.in_channels == 32 + 32


def test_other_task_heads_and_unknown_modules_are_named():
    yaml = arch_yaml("yolov5-p34")
    seg = {**yaml, "head": yaml["head"][:-1] + [[[17, 20], 1, "Segment", ["nc", "anchors", 32, 256]]]}
    with pytest.raises(ModelError, match="Segment is the head of an instance-segmentation model"):
        build_model(seg, device="meta")
    c2f = {**yaml, "backbone": [[-1, 1, "C2f", [64]]] + yaml["backbone"][1:]}
    with pytest.raises(ModelError, match="'C2f' is not supported; known modules: Conv, GhostConv") as err:
        build_model(c2f, device="meta")
    assert all(name in str(err.value) for name in MODULES)


# --------------------------------------------------------------------------- checkpoints as YOLOv5 pickles them


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "running" in n]:
            t.copy_(torch.rand_like(t) * 0.5 + 0.5 if t.ndim == 1 else torch.randn_like(t) * 0.05)
    return model


def _assert_same(loaded: nn.Module, model: nn.Module, half: bool) -> None:
    expected = {k: v.half().float() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


# One of each kind of head and block in the default run; the rest (same code paths) with -m slow.
QUICK_ROUND_TRIPS = {"yolov5n6", "yolov5-p7", "yolov5s-ghost", "yolov5s-transformer", "yolov3-tiny", "all-modules"}


@pytest.mark.parametrize("name", [n if n in QUICK_ROUND_TRIPS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(ARCHS)])
def test_release_checkpoint_round_trips(name, tmp_path, monkeypatch):
    """Random weights pickled as a v6.x release (models.yolo.Model, FP16) load strictly."""
    yaml = arch_yaml(name)
    if count_params(build_model(yaml, device="meta")) > 4_000_000:
        yaml = small(yaml)
    model = _randomized(build_model(yaml))
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        path = tmp_path / f"{name}.pt"
        torch.save(release_checkpoint(official_style(model, classes)), path)
    globals_ = set(scan_globals(path))
    assert "models.yolo.Model" in globals_ and "models.yolo.Detect" in globals_
    loaded = load_checkpoint(path)
    _assert_same(loaded.model, model, half=True)
    assert loaded.stride.tolist() == [float(s) for s in ARCHS[name][2]]
    assert type(loaded.model.model[-1]) is B.Detect
    assert [type(a) for a in loaded.model.model] == [type(a) for a in model.model]


@pytest.mark.parametrize("flavour", ["v7.0 release (DetectionModel)", "train.py last.pt", "FP32"])
def test_checkpoint_flavours(flavour, tmp_path, monkeypatch):
    model = _randomized(build_model(arch_yaml("prunable-modules"), nc=3))
    model.names = ["cat", "dog", "bird"]
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        if flavour.startswith("v7.0"):
            data, half = release_checkpoint(official_style(model, classes, top="DetectionModel")), True
        elif flavour == "FP32":
            data, half = release_checkpoint(official_style(model, classes, half=False)), False
        else:
            stale = official_style(_randomized(copy.deepcopy(model)), classes, top="DetectionModel").train()
            data, half = training_checkpoint(stale, official_style(model, classes, top="DetectionModel"), np), True
        path = tmp_path / "ckpt.pt"
        torch.save(data, path)
    loaded = load_checkpoint(path)
    _assert_same(loaded.model, model, half)  # train.py's file: the EMA, not the raw model
    assert loaded.names == ["cat", "dog", "bird"] and not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


@pytest.mark.parametrize("top,what", [("SegmentationModel", "instance-segmentation"),
                                      ("ClassificationModel", "classification")])
def test_other_task_checkpoints_say_what_they_are(top, what, tmp_path, monkeypatch):
    model = build_model(small(arch_yaml("yolov5-p34")))
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        path = tmp_path / f"{top}.pt"
        torch.save(release_checkpoint(official_style(model, classes, top=top)), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert f"it is a YOLOv5 {what} checkpoint (it contains models.yolo.{top})" in message
    assert "evaluates object-detection models" in message


def test_unknown_yolov5_class_vs_code_executing_global(tmp_path, monkeypatch):
    """A class of YOLOv5's namespaces this version lacks is named as such, with the supported list;
    any other unknown global is refused for safety."""
    model = build_model(small(arch_yaml("yolov5-p34")))
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        new_cls = type("C2f", (nn.Module,), {"__module__": "models.common", "__qualname__": "C2f"})
        mp.setattr(__import__("sys").modules["models.common"], "C2f", new_cls, raising=False)
        pickled = official_style(model, classes)
        pickled.model[2] = new_cls()
        path = tmp_path / "c2f.pt"
        torch.save(release_checkpoint(pickled), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "references models.common.C2f, a YOLOv5 class this version does not know" in message
    assert "supported YOLOv5 modules: Conv, GhostConv" in message and "DWConvTranspose2d" in message
    assert "for safety" not in message


def test_save_round_trip_of_every_module(tmp_path):
    """Our own format: a fused all-modules model (transposed convs included) comes back equal."""
    model = fuse(_randomized(build_model(arch_yaml("all-modules"))))
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "all.pt")).model
    assert is_fused(loaded)
    _assert_same(loaded, model, half=False)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


@pytest.mark.slow
@pytest.mark.assets
def test_p6_model_evaluates_at_1280(tmp_path, monkeypatch, val128_dir):
    """A YOLOv5n6 checkpoint (random weights, official pickling) evaluates on coco-val128 at its
    native 1280 (first 16 images; numbers not pinned: random weights detect nothing useful)."""
    from test_model_k5 import evaluate_val128

    model = build_model(load_model_yaml("yolov5n6"))
    with torch.no_grad():  # boxes of one class from the P6 level only pass conf 0.001: COCOeval gets rows, NMS stays small
        for level, conv in enumerate(model.model[-1].m):
            bias = conv.bias.view(3, -1)
            bias[:, 4], bias[:, 5:] = (4.0 if level == 3 else -20.0), -20.0
            bias[:, 5] = 2.0
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        path = tmp_path / "yolov5n6.pt"
        torch.save(release_checkpoint(official_style(model, classes, top="DetectionModel")), path)
    ckpt = load_checkpoint(path)
    assert ckpt.stride.tolist() == [8.0, 16.0, 32.0, 64.0]
    stats = evaluate_val128(fuse(ckpt.model), ckpt.names, int(ckpt.stride.max()), val128_dir, imgsz=1280, limit=16)
    assert set(stats) >= {"mAP50-95", "mAP50", "AR100"} and all(0 <= v <= 1 for v in stats.values())
    assert stats["AR100"] > 0  # person boxes from the stride-64 level reached the evaluation


@pytest.mark.parametrize("size", "nsmlx")
def test_p6_hydra_options_name_release_and_native_size(size):
    from omegaconf import OmegaConf

    from sweep.config.schema import ModelConfig

    option = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"yolov5{size}6.yaml")
    assert option.name == f"yolov5{size}6" and option.imgsz == 1280
    assert option.url == f"https://github.com/ultralytics/yolov5/releases/download/v7.0/yolov5{size}6.pt"
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), option)  # the schema takes every key
    assert merged.imgsz == 1280
    assert build_model(load_model_yaml(option.name), device="meta").stride_values == [8.0, 16.0, 32.0, 64.0]
