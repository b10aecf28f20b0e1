"""prune.save's pickle-free artifact: safetensors weights + JSON description, read back strictly."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from helpers import make_cfg

from sweep.config.spec import PruneSpec
from sweep.job import JobContext, run_job
from sweep.memo import ProcessMemo
from sweep.model import CheckpointError, fuse, load_artifact, load_checkpoint, save_artifact
from sweep.model.artifact import artifact_sizes
from sweep.prune import PRUNERS

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def v5n_channel(v5n):
    return PRUNERS["channel"](fuse(copy.deepcopy(v5n)), 0.3, PruneSpec("channel"))


def _is_pickle_free(files) -> None:
    """safetensors = 8-byte little-endian header length, a JSON header, raw bytes; the description is JSON."""
    raw = files.weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert all(set(v) == {"dtype", "shape", "data_offsets"} for k, v in header.items() if k != "__metadata__")
    json.loads(files.description.read_text())
    for data in (raw[:8 + n], files.description.read_bytes()):
        assert b"\x80\x02" not in data[:2] and b"torch._utils" not in data and b"collections" not in data


def test_channel_pruned_artifact_loads_back_strictly_with_its_channel_counts(tmp_path, v5n_channel):
    files = save_artifact(v5n_channel, tmp_path, "pruned", meta={"sparsity": 0.3})
    _is_pickle_free(files)
    desc = json.loads(files.description.read_text())
    convs = {n: m for n, m in v5n_channel.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert desc["channels"] == {n: [m.in_channels, m.out_channels] for n, m in convs.items()}
    assert desc["channels"]["model.0.conv"][1] < 16  # pruned: yolov5n's stem has 16 channels dense
    for path in (tmp_path, files.description, files.weights):  # folder, .json or .safetensors
        loaded = load_checkpoint(path)
        assert loaded.meta == {"sparsity": 0.3} and loaded.names == list(v5n_channel.names)
        x = torch.rand(1, 3, 128, 128)
        with torch.no_grad():
            assert torch.equal(loaded.model(x)[0], v5n_channel(x)[0])
    stored, compressed = artifact_sizes(files)
    assert stored == pytest.approx(files.nbytes / 1e6) and 0 < compressed < stored


def test_unstructured_zeros_show_in_the_compressed_size(tmp_path, v5n_fused):
    dense = artifact_sizes(save_artifact(v5n_fused, tmp_path / "d"))
    pruned = PRUNERS["l1_unstructured"](copy.deepcopy(v5n_fused), 0.5, PruneSpec("l1_unstructured"))
    sparse = artifact_sizes(save_artifact(pruned, tmp_path / "s"))
    assert sparse[0] == pytest.approx(dense[0], rel=0.01) and sparse[1] < 0.8 * dense[1]


def _edit(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("what,change,match", [
    ("unknown key", lambda d: d.update(extra=1), "unknown"),
    ("missing key", lambda d: d.pop("layers"), "missing"),
    ("version", lambda d: d.update(version=99), "version 99"),
    ("sha256", lambda d: d["weights"].update(sha256="0" * 64), "sha256"),
    ("path escape", lambda d: d["weights"].update(file="../x.safetensors"), "plain file name"),
    ("channel count", lambda d: d["layers"]["model.0.conv"].update(out_channels=3), "shape"),
    ("class names", lambda d: d.update(names=["a"]), "class names"),
])
def test_a_tampered_description_is_refused(tmp_path, v5n_channel, what, change, match):
    files = save_artifact(v5n_channel, tmp_path, "pruned")
    _edit(files.description, change)
    with pytest.raises(CheckpointError, match=match):
        load_artifact(tmp_path)


def test_truncated_weights_are_refused(tmp_path, v5n_channel):
    files = save_artifact(v5n_channel, tmp_path, "pruned")
    files.weights.write_bytes(files.weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="bytes"):
        load_artifact(files.weights)


def test_extra_tensor_is_refused_even_with_a_matching_digest(tmp_path, v5n_channel):
    from safetensors.torch import load_file, save_file

    from sweep.model.artifact import _sha256

    files = save_artifact(v5n_channel, tmp_path, "pruned")
    state = load_file(str(files.weights)) | {"model.99.weight": torch.zeros(3)}
    save_file(state, str(files.weights))
    _edit(files.description, lambda d: d["weights"].update(bytes=files.weights.stat().st_size,
                                                            sha256=_sha256(files.weights)))
    with pytest.raises(CheckpointError, match="model.99.weight"):
        load_artifact(tmp_path)


def test_saved_artifact_evaluates_to_the_in_memory_models_map(tmp_path, assets):
    """prune.save=true on a channel-pruned job; the artifact evaluated as model=custom gives the same mAP."""
    memo = ProcessMemo()
    common = ("data=coco-val128", "data.limit=8", "eval.imgsz=256", "mlflow.enabled=false")
    first = run_job(make_cfg(tmp_path, "model=yolov5n", *common, "prune=channel", "sparsity=0.3",
                             "prune.save=true"), JobContext(tmp_path / "a"), memo).metrics
    again = run_job(make_cfg(tmp_path, "model=custom", f"model.weights={tmp_path / 'a' / 'pruned.json'}", *common,
                             "sparsity=0"), JobContext(tmp_path / "b"), memo).metrics
    for key in ("mAP50-95", "mAP50", "AR100", "params"):
        assert again[key] == first[key], key
