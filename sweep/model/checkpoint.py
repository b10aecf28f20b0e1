"""Safe loading of YOLOv5 checkpoints, and our own save format.

Official Ultralytics ``.pt`` files are ``torch.save`` pickles of module objects from
the YOLOv5 repo (``models.yolo.Model``, ``models.common.Conv``, ...). They are read
without that repo and without running code from the file:

1. a static scan of the pickle opcodes lists every global the file references; any
   global outside ``allowed_globals()`` is refused with ``CheckpointError`` naming it;
2. ``torch.load(weights_only=True)`` (torch's restricted unpickler) then loads the file
   inside a ``torch.serialization.safe_globals`` context that admits only harmless torch.nn
   classes and inert stand-ins registered under the YOLOv5 class names;
3. the stand-in tree yields the ``yaml``, ``names``, ``stride`` and state_dict; our
   ``DetectionModel`` is rebuilt from the yaml and the state_dict loaded strictly (FP32).

``save_checkpoint`` writes plain data only (yaml, names, stride, the shape of every conv
and batch-norm layer, state_dict), so ``load_checkpoint`` rebuilds pruned and fused models
with their actual channel counts.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
import re
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from sweep.assets import atomic_write, file_sha256
from sweep.model.yolo import MODULES, Conv, DetectionModel, ModelError, build_model, materialize

FORMAT = "yolov5-sparsity-checkpoint"
FORMAT_VERSION = 1

# Official class names that may appear in a YOLOv5 detection checkpoint; each gets an inert
# stand-in. models/common.py of v5.0-v7.0 (some classes lived in models/experimental.py in
# early releases), the detection model and head of models/yolo.py, utils/activations.py.
_COMMON = ("Conv", "DWConv", "DWConvTranspose2d", "TransformerLayer", "TransformerBlock", "Bottleneck",
           "BottleneckCSP", "CrossConv", "C3", "C3x", "C3TR", "C3SPP", "C3Ghost", "SPP", "SPPF", "Focus",
           "GhostConv", "GhostBottleneck", "Contract", "Expand", "Concat", "MixConv2d")
YOLOV5_CLASSES = (
    "models.yolo.Model", "models.yolo.DetectionModel", "models.yolo.BaseModel", "models.yolo.Detect",
    *(f"models.common.{c}" for c in _COMMON),
    "models.experimental.CrossConv", "models.experimental.MixConv2d", "models.experimental.Sum",
    "models.experimental.GhostConv", "models.experimental.GhostBottleneck",
    "utils.activations.SiLU", "utils.activations.Hardswish",
)
# Classes of other YOLOv5 tasks: a checkpoint with one of them is named for what it is.
OTHER_TASK_CLASSES = {
    "models.yolo.SegmentationModel": "a YOLOv5 instance-segmentation checkpoint",
    "models.yolo.Segment": "a YOLOv5 instance-segmentation checkpoint",
    "models.common.Proto": "a YOLOv5 instance-segmentation checkpoint",
    "models.yolo.ClassificationModel": "a YOLOv5 classification checkpoint",
    "models.common.Classify": "a YOLOv5 classification checkpoint",
}
# Namespaces of the YOLOv5 repository: an unknown class there is a module this version lacks.
YOLOV5_NAMESPACES = ("models.", "utils.")
# Non-model values some checkpoints carry (training options, numpy fitness scores): read as
# opaque placeholders, never constructed.
OPAQUE_CLASSES = (
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.Float64DType", "numpy.dtypes.Float32DType", "numpy.dtypes.Int64DType",
    "pathlib.PosixPath", "pathlib.WindowsPath", "argparse.Namespace",
)
# torch.nn classes found in YOLOv5 checkpoints: their unpickling only fills attributes.
TORCH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.ModuleList, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SiLU, nn.Hardswish,
    nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Identity, nn.Mish, nn.GELU, nn.ELU, nn.Tanh,
    nn.MaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear,
    nn.MultiheadAttention,
)
# Globals torch itself needs to rebuild tensors and plain containers.
_TORCH_DATA_GLOBALS = (
    "collections.OrderedDict", "builtins.set", "_codecs.encode",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter",
    "torch.Size", "torch.device", "torch.Tensor",
)
# State-dict entries of old releases that the current architecture does not have.
LEGACY_BUFFERS = ("anchor_grid",)  # v5.0 registered Detect.anchor_grid as a buffer

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
# torch's safe_globals context edits a module-level registry; one load at a time keeps
# concurrent loads in threads from removing each other's entries.
_LOAD_LOCK = threading.Lock()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: the message names the file and the reason."""


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint: FP32, eval mode (unfused unless it was saved fused)."""

    model: DetectionModel
    names: list[str]
    stride: torch.Tensor
    yaml: dict[str, Any]
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Allowlist and static scan
# ---------------------------------------------------------------------------------------


def _storage_globals() -> set[str]:
    return {f"torch.{cls.__name__}" for cls in torch._storage_classes} | {"torch.storage.UntypedStorage"}


def _dtype_globals() -> set[str]:
    return {str(v) for v in vars(torch).values() if isinstance(v, torch.dtype)}


def allowed_globals() -> frozenset[str]:
    """Every dotted global name a checkpoint may reference (anything else is refused)."""
    names = set(_TORCH_DATA_GLOBALS) | set(YOLOV5_CLASSES) | set(OPAQUE_CLASSES)
    names |= {f"{c.__module__}.{c.__qualname__}" for c in TORCH_MODULES}
    return frozenset(names | _storage_globals() | _dtype_globals())


def _global_name(module: str, name: str) -> str:
    return f"{_PY2_MODULES.get(module, module)}.{name}"


def _scan_one(stream: io.BytesIO) -> Iterator[str]:
    """Dotted names of the globals referenced by the next pickle in ``stream`` (static, no execution)."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # recent pushed values, to resolve STACK_GLOBAL's operands
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            yield _global_name(module, name)
        elif op.name == "STACK_GLOBAL":
            module, name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            if isinstance(module, str) and isinstance(name, str):
                yield _global_name(module, name)
            else:
                yield "<a STACK_GLOBAL whose name is computed at load time>"
        elif op.name in ("EXT1", "EXT2", "EXT4"):
            yield f"<copyreg extension code {arg}>"
        if op.name in _STRING_OPS:
            pushed.append(arg)
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name not in ("STOP", "PROTO", "FRAME"):
            pushed.append(None)


def _pickle_bytes(path: Path) -> tuple[bytes, bool]:
    """The pickle stream of a checkpoint and whether it came from a torch zip archive."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04":
        return path.read_bytes(), False
    try:
        with zipfile.ZipFile(path) as zf:
            records = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not records:
                raise CheckpointError(f"cannot load {path}: it is a zip archive without data.pkl, "
                                      "not a torch.save checkpoint (TorchScript or another format?)")
            damaged = zf.testzip()  # CRC of every record: catches corrupted tensor data too
            if damaged is not None:
                raise CheckpointError(f"cannot load {path}: the file is corrupt (record {damaged} fails "
                                      "its CRC check); download it again")
            return zf.read(records[0]), True
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {path}: the file is truncated or corrupt "
                              f"(not a readable zip archive: {e}); download it again") from e


def scan_globals(path: str | os.PathLike) -> list[str]:
    """Dotted names of every global the checkpoint's pickle references, in order of appearance.

    Zip checkpoints: the one data.pkl. Legacy/raw pickles: the consecutive pickles at the
    start of the file (a legacy torch file ends with raw storage bytes, where scanning stops).
    """
    path = Path(path)
    data, is_zip = _pickle_bytes(path)
    stream, found, parsed = io.BytesIO(data), [], 0
    while stream.tell() < len(data) and parsed < (1 if is_zip else 8):
        try:
            found.extend(_scan_one(stream))
        except ValueError as e:
            if parsed == 0:
                raise CheckpointError(f"cannot load {path}: not a PyTorch checkpoint, or truncated/"
                                      f"corrupt (its pickle does not parse: {e})") from e
            break
        parsed += 1
    return list(dict.fromkeys(found))


def _supported_modules() -> str:
    return ", ".join(MODULES)


def unknown_global_message(path: Path, name: str) -> str:
    """Why a global outside the allowlist is refused: another task, a YOLOv5 module this
    version lacks, or a global that could run code."""
    if name in OTHER_TASK_CLASSES:
        return (f"cannot load {path}: it is {OTHER_TASK_CLASSES[name]} (it contains {name}); this tool "
                "evaluates object-detection models (YOLOv5 Detect head) only")
    if name.startswith("torchvision.models."):
        return (f"cannot load {path}: it is a classification checkpoint (it contains {name}); this tool "
                "evaluates YOLOv5 object-detection models only")
    if name.startswith(YOLOV5_NAMESPACES):
        return (f"refusing to load {path}: it references {name}, a YOLOv5 class this version does not "
                f"know (not a module it can rebuild); supported YOLOv5 modules: {_supported_modules()}")
    return (f"refusing to load {path}: it references the global {name}, which a YOLOv5 checkpoint never "
            "needs; unpickling it could execute code, so the file is refused for safety")


def _refuse_unknown_globals(path: Path) -> None:
    allowed = allowed_globals()
    found = scan_globals(path)
    for name in found:  # the task first: a segmentation file also has unknown heads
        if name in OTHER_TASK_CLASSES or name.startswith("torchvision.models."):
            raise CheckpointError(unknown_global_message(path, name))
    for name in found:
        if name not in allowed:
            raise CheckpointError(unknown_global_message(path, name))


# ---------------------------------------------------------------------------------------
# Restricted torch.load with stand-ins
# ---------------------------------------------------------------------------------------


class _StandIn(nn.Module):
    """Receives the pickled state of a YOLOv5-repo module: parameters, buffers, submodules."""

    pickled_name = ""

    def forward(self, *args, **kwargs):
        raise CheckpointError(f"{self.pickled_name} is a stand-in used to read a checkpoint; it cannot run")


class _Opaque:
    """Placeholder for non-model values (numpy scalars, paths, options): keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return "<opaque>"


@functools.cache
def _safe_globals() -> tuple[Any, ...]:
    """Entries for ``torch.serialization.safe_globals``: torch.nn classes, stand-ins, placeholders.
    Built once: the same stand-in classes serve every load (and match an earlier registration)."""
    entries: list[Any] = list(TORCH_MODULES)
    for dotted in YOLOV5_CLASSES:
        short = dotted.rsplit(".", 1)[1]
        cls = type(short, (_StandIn,), {"pickled_name": dotted, "__module__": __name__})
        entries.append((cls, dotted))
    entries += [(_Opaque, dotted) for dotted in OPAQUE_CLASSES]
    return tuple(entries)


def _refusal_message(path: Path, torch_message: str) -> str:
    """One line out of torch's multi-paragraph weights_only error."""
    match = re.search(r"GLOBAL (\S+)", torch_message)
    if match:
        return unknown_global_message(path, match.group(1))
    lines = [ln.strip() for ln in torch_message.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return f"refusing to load {path}: torch's restricted unpickler rejected it: {(useful or lines or ['?'])[0]}"


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` admitting only our allowlist; errors -> CheckpointError."""
    try:
        with _LOAD_LOCK:
            # entries the caller registered already stay registered after the context exits
            registered = set(torch.serialization.get_safe_globals())
            entries = [e for e in _safe_globals() if e not in registered]
            with torch.serialization.safe_globals(entries):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal_message(path, str(e))) from e
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a malformed record fails anywhere in torch: one error kind
        raise CheckpointError(f"cannot load {path}: the file is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------
# From the loaded object to our model
# ---------------------------------------------------------------------------------------


def _names_list(names: Any, nc: int) -> list[str]:
    """Class names as a list of nc strings (YOLOv5 stores a list, v7 may store {index: name})."""
    if names is None:
        return [str(i) for i in range(nc)]
    try:
        if isinstance(names, Mapping):
            names = [names[k] for k in sorted(names, key=int)]
        return [str(n) for n in names]
    except (TypeError, ValueError) as e:
        raise ValueError(f"its class names {str(names)[:80]!r} are not a list or an index -> name mapping") from e


def _checked_names(names: Any, nc: int, path: Path) -> list[str]:
    try:
        out = _names_list(names, nc)
    except ValueError as e:
        raise CheckpointError(f"cannot load {path}: {e}") from e
    if len(out) != nc:
        raise CheckpointError(f"cannot load {path}: it has {len(out)} class names for nc={nc} classes")
    return out


def _official_model(obj: Any, path: Path) -> nn.Module:
    """The pickled model of an official checkpoint (EMA when present)."""
    if isinstance(obj, _StandIn):
        return obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"cannot load {path}: expected a checkpoint dict, got {type(obj).__name__}")
    ema, model = obj.get("ema"), obj.get("model")
    chosen = ema if isinstance(ema, nn.Module) else model
    if not isinstance(chosen, _StandIn):
        raise CheckpointError(f"cannot load {path}: no YOLOv5 model under 'ema' or 'model' "
                              f"(keys: {', '.join(map(str, obj.keys()))})")
    return chosen


def _without_hooks(module: nn.Module) -> None:
    """Empty every hook registry in the unpickled tree, so state_dict() calls nothing from the file."""
    for m in module.modules():
        for attr in [k for k in vars(m) if k.startswith("_") and "hooks" in k]:
            if isinstance(getattr(m, attr), dict):
                setattr(m, attr, OrderedDict())


def _state_dict_fp32(module: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The unpickled tree's state_dict, legacy buffers dropped, floating tensors in FP32."""
    try:
        _without_hooks(module)
        state = module.state_dict()
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {path}: its model object is malformed ({e})") from e
    return _fp32({k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in LEGACY_BUFFERS}, path)


def _fp32(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"cannot load {path}: its state_dict is not a mapping of tensors")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:600]
        raise CheckpointError(f"cannot load {path}: its weights do not fit the model built from its "
                              f"yaml: {detail}") from e


def _build_meta(yaml: Any, path: Path) -> DetectionModel:
    """The model its yaml describes, on the meta device: exact shapes, no tensor memory."""
    if not isinstance(yaml, Mapping):
        raise CheckpointError(f"cannot load {path}: the checkpoint has no model yaml dict")
    try:
        return build_model(yaml, device="meta")
    except ModelError as e:
        raise CheckpointError(f"cannot load {path}: cannot build its model from its yaml: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError,
            ZeroDivisionError, RecursionError) as e:
        raise CheckpointError(f"cannot load {path}: cannot build its model from its yaml: "
                              f"{type(e).__name__}: {e}") from e


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _compare_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse, naming the first disagreeing entry, unless the state_dict has exactly the
    model's entries with the model's shapes (checked while the model is still on meta)."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"cannot load {path}: its weights do not fit the model its yaml describes: "
                                  f"{key} {_shape(value)} is missing from the weights")
        if _shape(state[key]) != _shape(value):
            raise CheckpointError(f"cannot load {path}: its weights do not fit the model its yaml describes: "
                                  f"{key} has shape {_shape(state[key])} in the weights, the yaml builds "
                                  f"{_shape(value)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"cannot load {path}: its weights do not fit the model its yaml describes: "
                              f"{extra[0]} {_shape(state[extra[0]])} is not in that model"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _realize(model: DetectionModel, state: Mapping[str, torch.Tensor], path: Path) -> DetectionModel:
    """Shapes checked on meta, then real storage and a strict load."""
    _compare_shapes(model, state, path)
    materialize(model)
    _load_strict(model, state, path)
    return model


def _check_stride(model: DetectionModel, stride: Any, path: Path) -> None:
    if stride is None:
        return
    try:
        saved = torch.as_tensor(stride, dtype=torch.float32, device="cpu").flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {path}: its stride {stride!r} is not a list of numbers") from e
    built = torch.tensor(model.stride_values, dtype=torch.float32)
    if saved.shape != built.shape or not torch.equal(saved, built):
        raise CheckpointError(f"cannot load {path}: it says stride {saved.tolist()}, the model built "
                              f"from its yaml has {built.tolist()}")


def _from_official(obj: Any, path: Path) -> tuple[DetectionModel, dict[str, Any]]:
    pickled = _official_model(obj, path)
    state = _state_dict_fp32(pickled, path)
    model = _build_meta(getattr(pickled, "yaml", None), path)
    _check_stride(model, getattr(pickled, "stride", None), path)
    names = _checked_names(getattr(pickled, "names", None), model.yaml["nc"], path)
    _realize(model, state, path)
    model.names = names
    return model, {}


# ---------------------------------------------------------------------------------------
# Our own format
# ---------------------------------------------------------------------------------------


_SPEC_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)


def _layer_spec(module: nn.Module) -> dict[str, Any]:
    """Plain-data description of a (transposed) Conv2d / BatchNorm2d, channel counts read from its tensors."""
    if isinstance(module, nn.Conv2d):
        return {"kind": "Conv2d", "in_channels": module.weight.shape[1] * module.groups,
                "out_channels": module.weight.shape[0], "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups,
                "bias": module.bias is not None, "padding_mode": module.padding_mode}
    if isinstance(module, nn.ConvTranspose2d):  # weight is [in, out / groups, kh, kw]
        return {"kind": "ConvTranspose2d", "in_channels": module.weight.shape[0],
                "out_channels": module.weight.shape[1] * module.groups, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride), "padding": list(module.padding),
                "output_padding": list(module.output_padding), "dilation": list(module.dilation),
                "groups": module.groups, "bias": module.bias is not None}
    return {"kind": "BatchNorm2d", "num_features": module.running_mean.shape[0] if
            module.running_mean is not None else module.weight.shape[0],
            "eps": module.eps, "momentum": module.momentum, "affine": module.affine,
            "track_running_stats": module.track_running_stats}


def _module_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    kw = {k: v for k, v in spec.items() if k != "kind"}
    if spec.get("kind") in ("Conv2d", "ConvTranspose2d"):
        for key in ("kernel_size", "stride", "dilation", "output_padding"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if not isinstance(kw["padding"], str):
            kw["padding"] = tuple(kw["padding"])
        return (nn.Conv2d if spec["kind"] == "Conv2d" else nn.ConvTranspose2d)(**kw)
    if spec.get("kind") == "BatchNorm2d":
        return nn.BatchNorm2d(**kw)
    raise ValueError(f"unknown layer kind {spec.get('kind')!r}")


def _plain_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """CPU state_dict; pending torch.nn.utils.prune masks are applied (``x_orig * x_mask`` -> ``x``)."""
    raw = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in raw.items():
        if key.endswith("_mask") and key[:-5] + "_orig" in raw:
            continue
        if key.endswith("_orig") and key[:-5] + "_mask" in raw:
            value = value * raw[key[:-5] + "_mask"]
            key = key[:-5]
        out[key] = value.detach().cpu().clone()
    return out


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is plain data (str, numbers, bool, None, lists, dicts)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; only plain data can be saved")


def save_checkpoint(model: DetectionModel, path: str | os.PathLike,
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (dense, pruned, channel-pruned or fused) so ``load_checkpoint`` reads it back.

    The file is a torch.save of plain data: ``format``, ``version``, ``yaml``, ``names``,
    ``stride``, ``layers`` (shape of every Conv2d/BatchNorm2d by module name), ``state_dict``
    (CPU, the model's dtype) and ``meta`` (plain data of the caller's choice). Written
    atomically (temp file in the same folder, then rename).
    """
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    _check_plain(model.yaml, "yaml")
    data = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "yaml": model.yaml, "names": [str(n) for n in model.names],
        "stride": [float(s) for s in model.stride.tolist()],
        "layers": {name: _layer_spec(m) for name, m in model.named_modules() if isinstance(m, _SPEC_TYPES)},
        "state_dict": _plain_state_dict(model), "meta": meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


# Layer attributes the model's forward reads (set by the yaml parser on each top-level layer).
_LAYER_ATTRS = ("i", "f", "type", "np")


def _replacement(old: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """A module with the saved shape, keeping the old one's class (e.g. DWConvTranspose2d, whose
    state is its base class's) and the parser's layer attributes."""
    new = _module_from_spec(spec)
    if type(old) is not type(new) and isinstance(old, type(new)):
        new.__class__ = type(old)
    for attr in _LAYER_ATTRS:
        if attr in vars(old):
            setattr(new, attr, getattr(old, attr))
    return new


def _apply_layer_specs(model: nn.Module, specs: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Give every (transposed) Conv2d/BatchNorm2d the saved shape (on the model's device, meta
    while loading); drop the ``bn`` of Convs saved fused."""
    present = {n for n, m in model.named_modules() if isinstance(m, _SPEC_TYPES)}
    unknown = sorted(set(specs) - present)
    if unknown:
        raise CheckpointError(f"cannot load {path}: saved layers {unknown[:5]} do not exist in the "
                              "model built from its yaml")
    device = next(model.parameters()).device
    for name in sorted(present, key=lambda n: n.count("."), reverse=True):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if name in specs:
            try:
                with torch.device(device):
                    setattr(parent, attr, _replacement(getattr(parent, attr), specs[name]))
            except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
                raise CheckpointError(f"cannot load {path}: bad layer description for {name}: {e}") from e
        elif isinstance(parent, Conv) and attr == "bn":
            del parent.bn
        else:
            raise CheckpointError(f"cannot load {path}: layer {name} is missing from the saved structure")


def _from_ours(obj: Mapping[str, Any], path: Path) -> tuple[DetectionModel, dict[str, Any]]:
    if obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"cannot load {path}: format version {obj.get('version')!r} is not "
                              f"supported (this code reads version {FORMAT_VERSION})")
    state = _fp32(obj.get("state_dict"), path)
    model = _build_meta(obj.get("yaml"), path)
    layers = obj.get("layers") or {}
    if not isinstance(layers, Mapping) or not all(isinstance(v, Mapping) for v in layers.values()):
        raise CheckpointError(f"cannot load {path}: its 'layers' entry is not a mapping of layer descriptions")
    _apply_layer_specs(model, layers, path)
    _check_stride(model, obj.get("stride"), path)
    names = _checked_names(obj.get("names"), model.yaml["nc"], path)
    _realize(model, state, path)
    model.names = names
    meta = obj.get("meta") or {}
    return model, dict(meta) if isinstance(meta, Mapping) else {}


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None) -> LoadedCheckpoint:
    """Load an official YOLOv5 ``.pt`` (any nc, v5.0+ modules), one written by ``save_checkpoint``, or an
    artifact of ``sweep.model.artifact.save_artifact`` (its folder, ``.json`` or ``.safetensors``).

    Never executes code from the file: globals outside ``allowed_globals()`` are refused
    with ``CheckpointError`` naming the global. Returns the rebuilt model in FP32, eval mode
    (unfused for official checkpoints; as saved for ours). ``sha256``: the file's digest when
    the caller has it already (else it is computed).
    """
    path = Path(path)
    if path.is_dir() or path.suffix in (".safetensors", ".json"):  # our pickle-free artifact
        from sweep.model.artifact import load_artifact
        return load_artifact(path)
    if not path.is_file():
        raise CheckpointError(f"cannot load {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot load {path}: the file is empty (an interrupted download?)")
    _refuse_unknown_globals(path)
    obj = _torch_load(path)
    try:
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            model, meta = _from_ours(obj, path)
        else:
            model, meta = _from_official(obj, path)
    except (CheckpointError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - any other surprise in a crafted file is still one error kind
        raise CheckpointError(f"cannot load {path}: its content is malformed ({type(e).__name__}: {e})") from e
    model.float().eval()
    return LoadedCheckpoint(model=model, names=list(model.names), stride=model.stride.clone(),
                            yaml=model.yaml, sha256=sha256 or file_sha256(path), meta=meta)
