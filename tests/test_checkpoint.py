"""Safe checkpoint loading and our save format (sweep/model/checkpoint.py). No mocks: real files."""

from __future__ import annotations

import copy
import io
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from sweep.model import checkpoint as ck
from sweep.model import yolo as M
from sweep.model.checkpoint import (CheckpointError, allowed_globals, load_checkpoint, save_checkpoint,
                              scan_globals)
from sweep.model.yolo import build_model, count_params, fuse, is_fused, load_model_yaml
from yolov5_pickle import fake_yolov5_package, official_style

YOLOV5N_SHA256 = "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"

# A small v5.0-style detector (Focus stem, SPP, BottleneckCSP) with 3 classes.
TINY = {
    "nc": 3, "depth_multiple": 0.33, "width_multiple": 0.125,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]],
                 [-1, 3, "BottleneckCSP", [128]], [-1, 1, "Conv", [256, 3, 2]],
                 [-1, 1, "SPP", [256, [5, 9, 13]]], [-1, 3, "C3", [256]]],
    "head": [[-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 2], 1, "Concat", [1]],
             [-1, 1, "C3", [128, False]], [[8, 5], 1, "Detect", ["nc", "anchors"]]],
}


# --------------------------------------------------------------------------- helpers


def _unicode(s: str) -> bytes:
    """BINUNICODE opcode pushing ``s``."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _short_unicode(s: str) -> bytes:
    """SHORT_BINUNICODE + MEMOIZE (as protocol 4 writes names for STACK_GLOBAL)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b + b"\x94"


def call_global(module: str, name: str, *args: str) -> bytes:
    """Pickle body (no PROTO/STOP) that calls module.name(*args) via GLOBAL + REDUCE."""
    return f"c{module}\n{name}\n".encode() + b"(" + b"".join(map(_unicode, args)) + b"tR"


def in_checkpoint_dict(value: bytes) -> bytes:
    """{'epoch': -1, 'model': <value>} around a pickle body."""
    return b"}(" + _unicode("epoch") + b"J" + struct.pack("<i", -1) + _unicode("model") + value + b"u"


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip archive whose data.pkl is ``data_pkl`` (other records from a real save)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, data_pkl if name.endswith("/data.pkl") else src.read(name))
    return path


def malicious_files(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, bytes, str]]:
    """name -> (file, its pickle bytes, the global it references). Each payload creates ``marker``."""
    touch = f"open({str(marker)!r}, 'w').close()"
    system = call_global("os", "system", f"touch {marker}")
    eval_stack_global = (b"\x80\x04" + _short_unicode("builtins") + _short_unicode("eval") + b"\x93"
                         + b"(" + _unicode(touch) + b"tR.")
    popen = (b"\x80\x02csubprocess\nPopen\n(" + b"]" + b"(" + _unicode("touch") + _unicode(str(marker))
             + b"e" + b"tR.")
    posix = b"\x80\x02" + in_checkpoint_dict(call_global("posix", "system", f"touch {marker}")) + b"."
    exec_ = b"\x80\x02" + call_global("builtins", "exec", touch) + b"."
    out = {
        "os.system in a torch zip": (torch_zip(tmp_path / "system.pt", b"\x80\x02" + system + b"."),
                                     b"\x80\x02" + system + b".", "os.system"),
        "builtins.eval via STACK_GLOBAL": (tmp_path / "eval.pt", eval_stack_global, "builtins.eval"),
        "subprocess.Popen raw pickle": (tmp_path / "popen.pt", popen, "subprocess.Popen"),
        "posix.system nested in a checkpoint dict": (torch_zip(tmp_path / "posix.pt", posix), posix,
                                                     "posix.system"),
        "builtins.exec": (tmp_path / "exec.pt", exec_, "builtins.exec"),
    }
    for path, payload, _ in out.values():
        if not path.exists():
            path.write_bytes(payload)
    return out


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


# --------------------------------------------------------------------------- official checkpoint


@pytest.mark.assets
def test_official_yolov5n_loads_strictly(yolov5n_path):
    loaded = load_checkpoint(yolov5n_path)
    model = loaded.model
    assert isinstance(model, M.DetectionModel)
    assert count_params(model) == 1_872_157
    assert not model.training and not is_fused(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loaded.sha256 == YOLOV5N_SHA256
    assert loaded.stride.tolist() == [8.0, 16.0, 32.0]
    assert len(loaded.names) == 80 and loaded.names[:3] == ["person", "bicycle", "car"]
    assert loaded.names[-1] == "toothbrush"
    yaml = load_model_yaml("yolov5n")
    yaml["ch"] = 3
    assert loaded.yaml == yaml  # our bundled yaml is the checkpoint's own
    # the FP16 weights arrive exactly (FP16 -> FP32 is lossless)
    w = model.model[24].m[0].weight
    assert torch.equal(w, w.half().float())
    assert model.model[24].anchors[0, 0].tolist() == [1.25, 1.625]


@pytest.mark.assets
def test_official_yolov5n_globals_are_the_expected_ones(yolov5n_path):
    found = scan_globals(yolov5n_path)
    assert "models.yolo.Model" in found and "models.common.C3" in found
    assert set(found) <= allowed_globals()


@pytest.mark.assets
def test_load_leaves_torch_safe_globals_registry_alone(yolov5n_path, tmp_path):
    before = list(torch.serialization.get_safe_globals())
    load_checkpoint(yolov5n_path)
    with pytest.raises(CheckpointError):
        load_checkpoint(torch_zip(tmp_path / "bad.pt", b"\x80\x02" + call_global("os", "getcwd") + b"."))
    after = list(torch.serialization.get_safe_globals())
    # the same entries (torch keeps them in a set: adding and removing ours may reorder the rest)
    assert len(after) == len(before) and set(after) == set(before)


def test_allowlist_excludes_code_execution():
    allowed = allowed_globals()
    for name in ("os.system", "posix.system", "builtins.eval", "builtins.exec", "builtins.getattr",
                 "builtins.__import__", "subprocess.Popen", "builtins.open", "torch.load", "pickle.loads"):
        assert name not in allowed


# --------------------------------------------------------------------------- malicious pickles


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("case", [
    "os.system in a torch zip", "builtins.eval via STACK_GLOBAL", "subprocess.Popen raw pickle",
    "posix.system nested in a checkpoint dict", "builtins.exec",
])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, case):
    marker = tmp_path / "PWNED"
    path, payload, global_name = malicious_files(tmp_path, marker)[case]

    # Control: an unrestricted unpickler really runs the payload (so the checks below mean something).
    run = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    raw = tmp_path / "payload.pkl"
    raw.write_bytes(payload)
    subprocess.run([sys.executable, "-c", run, str(raw)], check=False, capture_output=True, timeout=60)
    assert wait_for(marker, 10), "the crafted payload should create the marker when unpickled unsafely"
    marker.unlink()

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert f"refusing to load {path}: it references the global {global_name}" in message
    assert "never needs" in message

    # torch's restricted unpickler (the second gate) refuses it on its own too
    with pytest.raises(CheckpointError, match="refusing to load"):
        ck._torch_load(path)
    assert not wait_for(marker, 0.5), "the payload ran"


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.assets
def test_truncated_official_checkpoint(yolov5n_path, tmp_path):
    data = yolov5n_path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 3000):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated or corrupt") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


@pytest.mark.assets
def test_corrupted_bytes_in_official_checkpoint(yolov5n_path, tmp_path):
    data = bytearray(yolov5n_path.read_bytes())
    data[2_000_000:2_000_064] = b"\0" * 64  # inside the tensor records: zip CRC catches it
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    cases = {"empty.pt": b"", "text.pt": b"hello, I am not a checkpoint\n", "random.pt": bytes(range(256)) * 4}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)
    zpath = tmp_path / "other.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="without data.pkl"):
        load_checkpoint(zpath)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- custom official-style


def test_custom_nc_official_style_checkpoint(tmp_path, monkeypatch):
    """A custom-trained checkpoint: 3 classes, names as a dict (v7), EMA + model, numpy and opt values."""
    model = build_model(load_model_yaml("yolov5n"), nc=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        ema = official_style(model, classes)
        ema.names = {0: "cat", 1: "dog", 2: "bird"}
        stale = official_style(model, classes)
        with torch.no_grad():
            for p in stale.parameters():
                p.zero_()
        path = tmp_path / "best.pt"
        torch.save({"epoch": 12, "best_fitness": np.array([0.42]), "model": stale, "ema": ema,
                    "updates": 345, "optimizer": None, "opt": {"epochs": 13, "imgsz": 640, "lr": np.float64(0.01)},
                    "date": "2024-01-01T00:00:00"}, path)
    assert "models" not in sys.modules or not hasattr(sys.modules["models"], "yolo")
    found = set(scan_globals(path))
    assert "models.yolo.Model" in found and "numpy.ndarray" in found

    loaded = load_checkpoint(path)
    assert loaded.names == ["cat", "dog", "bird"]
    assert loaded.model.yaml["nc"] == 3 and loaded.model.model[-1].no == 8
    expected = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:  # the EMA weights, not the zeroed 'model'
        assert torch.equal(got[key], expected[key]), key


def test_v5_0_style_checkpoint_with_legacy_anchor_grid(tmp_path, monkeypatch):
    model = build_model(TINY)
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        pickled = official_style(model, classes, legacy_anchor_grid=True)
        pickled.names = ["a", "b", "c"]
        assert "model.9.anchor_grid" in pickled.state_dict()
        path = tmp_path / "v50.pt"
        torch.save({"epoch": -1, "model": pickled, "optimizer": None, "training_results": None}, path)
    loaded = load_checkpoint(path)
    assert "model.9.anchor_grid" not in loaded.model.state_dict()
    assert {layer.type for layer in loaded.model.model} >= {"Focus", "SPP", "BottleneckCSP"}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref, _ = copy.deepcopy(model).half().float()(x)
        out, _ = loaded.model(x)
    torch.testing.assert_close(out, ref)


def test_unsupported_module_in_yaml_is_a_clear_error(tmp_path, monkeypatch):
    model = build_model(TINY)
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        pickled = official_style(model, classes)
        pickled.yaml["backbone"][1] = [-1, 1, "C2f", [128, 3, 2]]  # YOLOv8's block
        pickled.names = ["a", "b", "c"]
        path = tmp_path / "c2f.pt"
        torch.save({"model": pickled}, path)
    with pytest.raises(CheckpointError, match="C2f"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- our format


def outputs(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)[0]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key


@pytest.mark.assets
def test_save_round_trip_official_model(yolov5n_path, tmp_path):
    original = load_checkpoint(yolov5n_path)
    path = save_checkpoint(original.model, tmp_path / "out" / "dense.pt", meta={"note": "dense", "s": [0.1]})
    loaded = load_checkpoint(path)
    assert loaded.names == original.names and loaded.yaml == original.yaml
    assert loaded.meta == {"note": "dense", "s": [0.1]}
    assert loaded.sha256 != original.sha256
    for key, value in original.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    x = torch.rand(1, 3, 96, 128)
    assert torch.equal(outputs(loaded.model, x), outputs(original.model, x))
    assert not list(path.parent.glob("*.tmp"))


def test_save_round_trip_fused(tmp_path):
    model = fuse(build_model(TINY))
    model.names = ["x", "y", "z"]
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "fused.pt")).model
    assert is_fused(loaded) and loaded.names == ["x", "y", "z"]
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def _shrink_bottleneck(b: M.Bottleneck, keep: int) -> None:
    """Keep the first ``keep`` hidden channels of a Bottleneck (a hand-made channel pruning)."""
    conv1, bn1, conv2 = b.cv1.conv, b.cv1.bn, b.cv2.conv
    new1 = nn.Conv2d(conv1.in_channels, keep, 1, bias=False)
    new1.weight.data = conv1.weight.data[:keep].clone()
    newbn = nn.BatchNorm2d(keep, eps=bn1.eps, momentum=bn1.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(newbn, name).data = getattr(bn1, name).data[:keep].clone()
    new2 = nn.Conv2d(keep, conv2.out_channels, 3, 1, 1, bias=False)
    new2.weight.data = conv2.weight.data[:, :keep].clone()
    b.cv1.conv, b.cv1.bn, b.cv2.conv = new1, newbn, new2


def test_save_round_trip_channel_pruned(tmp_path):
    model = build_model(load_model_yaml("yolov5n"))
    _shrink_bottleneck(model.model[2].m[0], 8)
    _shrink_bottleneck(model.model[23].m[0], 24)
    x = torch.rand(1, 3, 64, 96)
    expected = outputs(model, x)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "pruned.pt")).model
    assert loaded.model[2].m[0].cv1.conv.out_channels == 8
    assert loaded.model[23].m[0].cv2.conv.in_channels == 24
    assert count_params(loaded) == count_params(model) < 1_872_157
    assert_same_weights(loaded, model)
    # same weights; memory layouts may differ, so FP32 sums may differ in the last bits
    torch.testing.assert_close(outputs(loaded, x), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_save_round_trip_torch_pruning(tmp_path):
    tp = pytest.importorskip("torch_pruning")
    model = build_model(load_model_yaml("yolov5n"))
    heads = list(model.model[-1].m)
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, 3, 64, 64), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=heads)
    pruner.step()
    x = torch.rand(1, 3, 64, 64)
    expected = outputs(model, x)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "tp.pt")).model
    assert count_params(loaded) == count_params(model) < 1_000_000
    assert_same_weights(loaded, model)
    torch.testing.assert_close(outputs(loaded, x), expected, rtol=1e-5, atol=1e-3)


def test_save_applies_pending_prune_masks(tmp_path):
    model = build_model(TINY)
    conv = model.model[1].conv
    tprune.l1_unstructured(conv, "weight", amount=0.5)
    effective = conv.weight.detach().clone()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "masked.pt")).model
    sd = loaded.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in sd)
    assert torch.equal(sd["model.1.conv.weight"], effective)
    assert (effective == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_save_rejects_non_plain_meta(tmp_path):
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(build_model(TINY), tmp_path / "x.pt", meta={"bad": object()})
    assert not list(tmp_path.iterdir())


def test_our_format_needs_no_extra_globals(tmp_path):
    path = save_checkpoint(build_model(TINY), tmp_path / "plain.pt")
    assert all(not g.startswith(("models.", "sweep.", "numpy")) for g in scan_globals(path))
    data = torch.load(path, map_location="cpu", weights_only=True)  # no allowlist needed at all
    assert data["format"] == ck.FORMAT and data["version"] == ck.FORMAT_VERSION


@pytest.mark.assets
def test_callers_own_safe_globals_survive_a_load(yolov5n_path):
    with torch.serialization.safe_globals([nn.Conv2d]):
        load_checkpoint(yolov5n_path)
        assert nn.Conv2d in torch.serialization.get_safe_globals()


def test_malformed_files_in_our_format(tmp_path):
    good = torch.load(save_checkpoint(build_model(TINY), tmp_path / "good.pt"), weights_only=True)
    bad_layer = {**good["layers"], "model.0.conv.conv": {"kind": "Conv2d"}}
    cases = {  # file content -> expected message part
        "version": ({**good, "version": 99}, "format version 99"),
        "tensors": ({**good, "state_dict": {"model.0.conv.conv.weight": [1, 2, 3]}}, "not a mapping of tensors"),
        "layer": ({**good, "layers": bad_layer}, "bad layer description for model.0.conv.conv"),
        "missing": ({**good, "layers": {}}, "missing from the saved structure"),
        "yaml": ({**good, "yaml": None}, "no model yaml"),
        "fit": ({**good, "state_dict": {}}, "weights do not fit"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(data, path)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(err.value).startswith(f"cannot load {path}: ") and expected in str(err.value)


def test_session_cache_passes_its_digest_to_the_loader(yolov5n_path):
    from sweep.assets import file_sha256
    from sweep.memo import ProcessMemo

    cache = ProcessMemo()
    sha = cache.sha256(yolov5n_path)
    ckpt = cache.checkpoint(yolov5n_path, sha)
    assert ckpt.sha256 == file_sha256(yolov5n_path)
    assert list(cache.hashes.values()) == [ckpt.sha256]  # the one digest serves the config hash and the loader
    assert ckpt.sha256 is sha  # the same object: the loader did not hash again
    assert cache.checkpoint(yolov5n_path, sha) is ckpt
