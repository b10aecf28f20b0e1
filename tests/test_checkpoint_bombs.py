"""Issue #16 item 5: crafted checkpoints are refused before they can exhaust memory, and every
malformed file gives one CheckpointError. Each file is built here.

Findings reproduced: a small file whose yaml says depth_multiple 1000 (built 8.2 GB over 61 s
before the refusal), width_multiple 1000 (asked for 295 GB), a malformed tensor record (escaped
as a raw AttributeError). The model is now built on the meta device and every shape compared
with the file's state_dict before any real tensor exists.
"""

from __future__ import annotations

import io
import resource
import time
import zipfile

import pytest
import torch
from test_checkpoint import _unicode, torch_zip
from yolov5_pickle import fake_yolov5_package, official_style, release_checkpoint

from sweep.model import CheckpointError, load_checkpoint, save_checkpoint
from sweep.model.yolo import build_model, load_model_yaml

# Generous bounds for a refusal on a shared 2-core CPU: the bombs took 61 s and 8 GB before.
REFUSAL_SECONDS = 15
REFUSAL_MB = 500


@pytest.fixture(scope="module")
def v5n_model():
    return build_model(load_model_yaml("yolov5n"))


def official_file(tmp_path, monkeypatch, model, name: str, **yaml_changes):
    """An official-style (v6.x release) checkpoint of ``model`` whose pickled yaml is changed."""
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        pickled = official_style(model, classes)
        pickled.yaml.update(yaml_changes)
        path = tmp_path / name
        torch.save(release_checkpoint(pickled), path)
    return path


def refused(path, match: str) -> str:
    """Load ``path``: it must raise CheckpointError matching ``match`` quickly and without growing
    the process's peak memory by more than REFUSAL_MB."""
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert time.perf_counter() - t0 < REFUSAL_SECONDS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak0 < REFUSAL_MB
    assert str(err.value).startswith(f"cannot load {path}: ")
    return str(err.value)


def test_depth_multiple_1000_is_refused_at_once(tmp_path, monkeypatch, v5n_model):
    path = official_file(tmp_path, monkeypatch, v5n_model, "deep.pt", depth_multiple=1000)
    assert path.stat().st_size < 5_000_000
    refused(path, r"layer 2: cannot build C3 .*number 3000 after depth_multiple: allowed is 1\.\.100")


def test_deeper_yaml_within_limits_names_the_first_missing_parameter(tmp_path, monkeypatch, v5n_model):
    path = official_file(tmp_path, monkeypatch, v5n_model, "deeper.pt", depth_multiple=10)
    message = refused(path, "its weights do not fit the model its yaml describes")
    assert "model.2.m.1.cv1.conv.weight [16, 16, 1, 1] is missing from the weights" in message


def test_width_multiple_1000_is_refused_without_allocating(tmp_path, monkeypatch, v5n_model):
    path = official_file(tmp_path, monkeypatch, v5n_model, "wide.pt", width_multiple=1000)
    message = refused(path, "its weights do not fit the model its yaml describes")
    assert "model.0.conv.weight has shape [16, 3, 6, 6] in the weights, the yaml builds [64000, 3, 6, 6]" in message


def test_bombs_in_our_own_format(tmp_path):
    """Our format records every conv/BN shape, so a wide yaml is overridden by the saved shapes
    (nothing big is ever allocated); depth, classes and extra weights are refused."""
    model = build_model(load_model_yaml("yolov5n"))
    good = torch.load(save_checkpoint(model, tmp_path / "good.pt"), weights_only=True)
    for name, change, match in [("deep", {"depth_multiple": 1000}, "allowed is 1..100"),
                                ("classes", {"nc": 10**9}, "nc=1000000000 is invalid")]:
        path = tmp_path / f"{name}.pt"
        torch.save({**good, "yaml": {**good["yaml"], **change}}, path)
        refused(path, match)
    path = tmp_path / "extra.pt"
    torch.save({**good, "state_dict": {**good["state_dict"], "model.99.weight": torch.zeros(3)}}, path)
    refused(path, r"model\.99\.weight \[3\] is not in that model")
    path = tmp_path / "wide.pt"
    torch.save({**good, "yaml": {**good["yaml"], "width_multiple": 1000}}, path)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded = load_checkpoint(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak0 < REFUSAL_MB
    assert loaded.model.model[0].conv.weight.shape == (16, 3, 6, 6)


def test_huge_anchor_count_is_refused(tmp_path, monkeypatch, v5n_model):
    path = official_file(tmp_path, monkeypatch, v5n_model, "anchors.pt", anchors=10**9)
    refused(path, "anchors=1000000000: allowed is 1..100")


def test_malformed_tensor_record_is_a_checkpoint_error(tmp_path):
    """A tensor rebuilt from a string instead of a storage (torch raised a raw AttributeError)."""
    rebuild = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + _unicode("not a storage") + b"K\x00" + b"K\x02\x85"
               + b"K\x01\x85" + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR")
    path = torch_zip(tmp_path / "record.pt", b"\x80\x02}(" + _unicode("model") + rebuild + b"u.")
    refused(path, r"truncated or corrupt \(AttributeError: 'str' object has no attribute")


def test_short_tensor_record_is_a_checkpoint_error(tmp_path):
    buf = io.BytesIO()
    torch.save({"model": None, "w": torch.arange(1000.0)}, buf)
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():  # valid zip (CRCs right), but the tensor's bytes are cut
            data = src.read(name)
            dst.writestr(name, data[:10] if "/data/" in name else data)
    refused(path, "truncated or corrupt")


@pytest.mark.parametrize("case", ["names", "rows", "from", "stride", "yaml type", "module object"])
def test_malformed_official_content_is_one_error(case, tmp_path, monkeypatch, v5n_model):
    with monkeypatch.context() as mp:
        classes = fake_yolov5_package(mp)
        pickled = official_style(v5n_model, classes)
        if case == "names":
            pickled.names = {"a": "cat", "b": "dog"}
        elif case == "rows":
            pickled.yaml["backbone"][3] = "Conv"
        elif case == "from":
            pickled.yaml["head"][2] = [[-1, 99], 1, "Concat", [1]]
        elif case == "stride":
            pickled.stride = "eight"
        elif case == "yaml type":
            pickled.yaml = ["not", "a", "dict"]
        else:
            pickled.model._modules = ["not", "a", "dict"]
        path = tmp_path / "bad.pt"
        torch.save(release_checkpoint(pickled), path)
    refused(path, ".")
