"""Compact, pickle-free model artifact: safetensors weights + a JSON description of the architecture.

``save_artifact(model, folder)`` writes two files:

- ``<stem>.safetensors``: every state_dict tensor (CPU, the model's dtype; pending pruning masks
  applied). safetensors is a JSON header plus raw tensor bytes: reading it runs no code.
- ``<stem>.json``: ``format``, ``version``, the model ``yaml``, class ``names``, ``stride``, ``layers``
  (every Conv2d / ConvTranspose2d / BatchNorm2d by module name with its channel counts, so a
  channel-pruned or fused model is rebuilt with its real shapes), ``channels`` (``name -> [in, out]``
  of every conv, the human-readable summary), ``weights`` (file name, byte size, sha256) and ``meta``.

``load_artifact(path)`` reads it back strictly: the description must have exactly the known keys,
the weights file must have the recorded size and sha256, the model is rebuilt from the yaml on the
meta device, reshaped from ``layers``, shape-checked against the weights entry by entry and loaded
with ``strict=True``. Any problem is one :class:`CheckpointError` naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sweep.assets import atomic_write
from sweep.model.checkpoint import (_SPEC_TYPES, CheckpointError, LoadedCheckpoint, _apply_layer_specs, _build_meta,
                                    _check_plain, _check_stride, _checked_names, _fp32, _layer_spec,
                                    _plain_state_dict, _realize)
from sweep.model.yolo import DetectionModel

ZSTD_LEVEL = 3  # sweep.prune.accounting's level (size_mb_compressed), so both compressed sizes compare

ARTIFACT_FORMAT = "yolov5-sparsity-artifact"
ARTIFACT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
DESCRIPTION_SUFFIX = ".json"
_KEYS = {"format", "version", "yaml", "names", "stride", "layers", "channels", "weights", "meta"}
_WEIGHT_KEYS = {"file", "bytes", "sha256"}


@dataclass(frozen=True)
class ArtifactFiles:
    """The two files of one artifact."""

    weights: Path        # <stem>.safetensors
    description: Path    # <stem>.json

    @property
    def paths(self) -> list[Path]:
        return [self.weights, self.description]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(model: DetectionModel, folder: str | os.PathLike, stem: str = "model",
                  meta: Mapping[str, Any] | None = None) -> ArtifactFiles:
    """Write ``model`` (dense, pruned, channel-pruned or fused) as ``<folder>/<stem>.safetensors`` +
    ``<folder>/<stem>.json`` (each written atomically; the weights first, so a description always
    names complete weights). Returns the two paths."""
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    _check_plain(model.yaml, "yaml")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = ArtifactFiles(folder / f"{stem}{WEIGHTS_SUFFIX}", folder / f"{stem}{DESCRIPTION_SUFFIX}")
    # safetensors refuses tensors that share storage: every entry gets its own contiguous copy
    state = {k: v.contiguous().clone() for k, v in _plain_state_dict(model).items()}
    atomic_write(files.weights, lambda tmp: save_file(state, tmp, metadata={"format": ARTIFACT_FORMAT}))
    layers = {name: _layer_spec(m) for name, m in model.named_modules() if isinstance(m, _SPEC_TYPES)}
    channels = {name: [s["in_channels"], s["out_channels"]] for name, s in layers.items() if "in_channels" in s}
    description = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
        "yaml": model.yaml, "names": [str(n) for n in model.names],
        "stride": [float(s) for s in model.stride.tolist()],
        "layers": layers, "channels": channels,
        "weights": {"file": files.weights.name, "bytes": files.weights.stat().st_size,
                    "sha256": _sha256(files.weights)},
        "meta": meta,
    }
    text = json.dumps(description, indent=1, allow_nan=False)
    atomic_write(files.description, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return files


def is_artifact(path: str | os.PathLike) -> bool:
    """True when ``path`` is an artifact's description / weights file, or a folder holding one artifact."""
    try:
        _description_path(Path(path))
        return True
    except CheckpointError:
        return False


def _description_path(path: Path) -> Path:
    if path.is_dir():
        found = [p for p in sorted(path.glob(f"*{DESCRIPTION_SUFFIX}"))
                 if p.with_suffix(WEIGHTS_SUFFIX).is_file()]
        if len(found) != 1:
            raise CheckpointError(f"cannot load {path}: a model artifact folder holds exactly one "
                                  f"<name>.json + <name>.safetensors pair; found {len(found)}")
        return found[0]
    if path.suffix == WEIGHTS_SUFFIX:
        path = path.with_suffix(DESCRIPTION_SUFFIX)
    if path.suffix != DESCRIPTION_SUFFIX or not path.is_file():
        raise CheckpointError(f"cannot load {path}: not a model artifact (<name>.json next to <name>.safetensors)")
    return path


def _read_description(path: Path) -> dict[str, Any]:
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot load {path}: its description is not readable JSON ({e})") from e
    if not isinstance(desc, dict) or desc.get("format") != ARTIFACT_FORMAT:
        raise CheckpointError(f"cannot load {path}: not a {ARTIFACT_FORMAT} description")
    if desc.get("version") != ARTIFACT_VERSION:
        raise CheckpointError(f"cannot load {path}: artifact version {desc.get('version')!r} is not supported "
                              f"(this code reads version {ARTIFACT_VERSION})")
    if set(desc) != _KEYS:
        missing, extra = sorted(_KEYS - set(desc)), sorted(set(desc) - _KEYS)
        raise CheckpointError(f"cannot load {path}: its description keys differ from the format's "
                              f"(missing {missing}, unknown {extra})")
    w = desc["weights"]
    if not isinstance(w, dict) or set(w) != _WEIGHT_KEYS or not isinstance(w["file"], str) \
            or Path(w["file"]).name != w["file"]:
        raise CheckpointError(f"cannot load {path}: its 'weights' entry must be {{file, bytes, sha256}} with a "
                              "plain file name in the same folder")
    layers = desc["layers"]
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(f"cannot load {path}: its 'layers' entry is not a mapping of layer descriptions")
    return desc


def _read_weights(desc: Mapping[str, Any], folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = folder / desc["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(f"cannot load {weights}: the weights file its description names is missing")
    size = weights.stat().st_size
    if size != desc["weights"]["bytes"]:
        raise CheckpointError(f"cannot load {weights}: it has {size} bytes, its description says "
                              f"{desc['weights']['bytes']} (truncated or replaced?)")
    digest = _sha256(weights)
    if digest != desc["weights"]["sha256"]:
        raise CheckpointError(f"cannot load {weights}: its sha256 {digest[:12]}... differs from the one its "
                              f"description records ({str(desc['weights']['sha256'])[:12]}...)")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {weights}: not a readable safetensors file ({e})") from e
    return weights, _fp32(state, weights)


def load_artifact(path: str | os.PathLike) -> LoadedCheckpoint:
    """Strictly load an artifact written by :func:`save_artifact` (its folder, ``.json`` or
    ``.safetensors``): FP32, eval mode, the saved structure (channel counts, fused or not)."""
    desc_path = _description_path(Path(path))
    desc = _read_description(desc_path)
    weights, state = _read_weights(desc, desc_path.parent)
    try:
        model = _build_meta(desc["yaml"], desc_path)
        _apply_layer_specs(model, desc["layers"], desc_path)
        _check_stride(model, desc["stride"], desc_path)
        names = _checked_names(desc["names"], model.yaml["nc"], desc_path)
        _realize(model, state, weights)
    except (CheckpointError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a crafted description is still one error kind
        raise CheckpointError(f"cannot load {desc_path}: its content is malformed ({type(e).__name__}: {e})") from e
    model.names = names
    model.float().eval()
    meta = desc["meta"] if isinstance(desc["meta"], dict) else {}
    return LoadedCheckpoint(model=model, names=list(names), stride=model.stride.clone(), yaml=model.yaml,
                            sha256=desc["weights"]["sha256"], meta=dict(meta))


def artifact_sizes(files: ArtifactFiles, level: int | None = None) -> tuple[float, float]:
    """``(stored MB, zstd-compressed MB)`` of the artifact's two files (1e6 bytes), the compression the
    same as ``size_mb_compressed``'s (so unstructured zeros show up in the second number)."""
    raw = b"".join(p.read_bytes() for p in files.paths)
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL if level is None else level).compress(raw)
    return len(raw) / 1e6, len(packed) / 1e6
