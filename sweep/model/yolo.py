"""YOLOv5 detection models (P3-P5, P6, P2/P7 heads, every model-zoo variant) built from their yaml.

A model yaml (the dict an official checkpoint carries, or one of the files under
``sweep/model/cfg/``) has ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``,
optionally ``activation`` and ``ch``, and two lists of rows ``[from, number, module, args]``
(``backbone`` then ``head``). Each row becomes one layer of ``DetectionModel.model`` (an
``nn.Sequential``), so parameter names are the official ones (``model.0.conv.weight``,
``model.24.m.0.weight``, ``model.24.anchors``) and an official state_dict loads with
``strict=True``.

Module names are looked up in the explicit table ``MODULES`` (the modules of YOLOv5's
``models/common.py`` and ``models/experimental.py`` that its yaml parser accepts, plus the
``nn.*`` layers it allows); row arguments are resolved from a fixed set of names (``nc``,
``anchors``, ``None``, ``True``, ``False``) and the ``activation`` key from a small table of
forms: nothing in a yaml is ever evaluated. Channel and repeat rules per module are
YOLOv5's (see ``_layer_args``).

``build_model(yaml, device="meta")`` builds the structure without allocating any tensor
memory (PyTorch's meta device): the checkpoint loader compares every parameter shape with
the file's before anything real exists, then ``materialize`` gives the model CPU storage.

Tensor shape notation: B batch, C channels, H/W height/width, A anchors per level,
N = sum over levels of A*H*W, K = 5 + nc.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml as pyyaml
from torch import nn

from sweep.model.blocks import (BN_EPS, BN_MOMENTUM, C3SPP, C3TR, SPP, SPPF, Bottleneck, BottleneckCSP, C3,
                                C3Ghost, C3x, Concat, Contract, Conv, CrossConv, Detect, DWConv,
                                DWConvTranspose2d, Expand, Focus, GhostBottleneck, GhostConv, MixConv2d,
                                TransformerBlock, TransformerLayer, autopad, batchnorm, default_activation)

__all__ = ["MODULES", "ACTIVATIONS", "DetectionModel", "ModelError", "build_model", "materialize", "fuse",
           "fused_conv", "is_fused", "count_params", "load_model_yaml", "model_yaml_path", "make_divisible",
           "BN_EPS", "BN_MOMENTUM", "autopad", "Bottleneck", "BottleneckCSP", "C3", "C3Ghost", "C3SPP", "C3TR",
           "C3x", "Concat", "Contract", "Conv", "CrossConv", "Detect", "DWConv", "DWConvTranspose2d", "Expand",
           "Focus", "GhostBottleneck", "GhostConv", "MixConv2d", "SPP", "SPPF", "TransformerBlock",
           "TransformerLayer"]

STRIDE_PROBE = 256  # side of the zero image used to measure the output strides
# Sanity limits on yaml numbers that would make Python itself (not tensors) allocate without
# bound: per-row repeats after depth scaling, layers, anchors per level, classes.
MAX_REPEATS = 100
MAX_LAYERS = 1000
MAX_ANCHORS = 100
MAX_CLASSES = 100_000


class ModelError(ValueError):
    """A model yaml that cannot be built (unknown module, bad argument, ...)."""


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x`` (YOLOv5 channel rounding)."""
    return int(math.ceil(x / divisor) * divisor)


def _batchnorm_layer(c1: int) -> nn.BatchNorm2d:
    return batchnorm(c1)


# Explicit yaml module name -> class table. Nothing outside this table can be built.
MODULES: dict[str, Callable[..., nn.Module]] = {
    "Conv": Conv, "GhostConv": GhostConv, "DWConv": DWConv, "CrossConv": CrossConv, "MixConv2d": MixConv2d,
    "Focus": Focus, "Bottleneck": Bottleneck, "GhostBottleneck": GhostBottleneck,
    "BottleneckCSP": BottleneckCSP, "C3": C3, "C3x": C3x, "C3TR": C3TR, "C3SPP": C3SPP, "C3Ghost": C3Ghost,
    "SPP": SPP, "SPPF": SPPF, "DWConvTranspose2d": DWConvTranspose2d, "nn.ConvTranspose2d": nn.ConvTranspose2d,
    "nn.BatchNorm2d": _batchnorm_layer, "Concat": Concat, "Contract": Contract, "Expand": Expand,
    "nn.Upsample": nn.Upsample, "nn.MaxPool2d": nn.MaxPool2d, "nn.ZeroPad2d": nn.ZeroPad2d,
    "nn.Identity": nn.Identity, "Detect": Detect,
}
# Names YOLOv5 yamls may spell without the ``nn.`` prefix's module (``torch.nn.Upsample``).
_ALIASES = {f"torch.{k}": k for k in MODULES if k.startswith("nn.")}
# Heads of other tasks: named in the error so the user knows what the file is.
OTHER_TASK_HEADS = {"Segment": "an instance-segmentation", "Proto": "an instance-segmentation",
                    "Classify": "a classification"}

# (c1 from the input, args[0] = c2 scaled by width): YOLOv5's parser's first module set.
_CHANNEL_MODULES = frozenset({Conv, GhostConv, Bottleneck, GhostBottleneck, SPP, SPPF, DWConv, MixConv2d, Focus,
                              CrossConv, BottleneckCSP, C3, C3TR, C3SPP, C3Ghost, nn.ConvTranspose2d,
                              DWConvTranspose2d, C3x})
# Modules that take the repeat count as their third argument instead of being repeated.
_REPEAT_MODULES = frozenset({BottleneckCSP, C3, C3TR, C3Ghost, C3x})

# Activation forms allowed in a yaml's optional ``activation`` key (e.g. "nn.LeakyReLU(0.1)"):
# name -> (class, whether it takes one numeric argument).
ACTIVATIONS: dict[str, tuple[type[nn.Module], bool]] = {
    "SiLU": (nn.SiLU, False), "ReLU": (nn.ReLU, False), "ReLU6": (nn.ReLU6, False),
    "LeakyReLU": (nn.LeakyReLU, True), "Hardswish": (nn.Hardswish, False), "Sigmoid": (nn.Sigmoid, False),
    "Identity": (nn.Identity, False), "Mish": (nn.Mish, False), "GELU": (nn.GELU, False),
    "ELU": (nn.ELU, True), "Tanh": (nn.Tanh, False),
}
_ACT_RE = re.compile(r"^\s*(?:torch\.)?nn\.(\w+)\(\s*([-+0-9.eE]*)\s*\)\s*$")
_CONSTANTS: dict[str, Any] = {"None": None, "True": True, "False": False}


# ---------------------------------------------------------------------------------------
# Parsing the yaml rows
# ---------------------------------------------------------------------------------------


def _resolve_arg(arg: Any, yaml: Mapping[str, Any]) -> Any:
    """A yaml row argument with its symbolic names replaced (``nc``, ``anchors``, ``None``...).

    Other strings (e.g. the upsampling mode 'nearest') stay strings.
    """
    if isinstance(arg, str):
        if arg in ("nc", "anchors"):
            return yaml[arg]
        if arg in _CONSTANTS:
            return _CONSTANTS[arg]
    return arg


def _module_class(name: Any, row_index: int) -> Callable[..., nn.Module]:
    name = _ALIASES.get(name, name) if isinstance(name, str) else name
    if isinstance(name, str) and name in OTHER_TASK_HEADS:
        raise ModelError(f"layer {row_index}: {name} is the head of {OTHER_TASK_HEADS[name]} model; this tool "
                         "evaluates detection models (a Detect head)")
    if not isinstance(name, str) or name not in MODULES:
        raise ModelError(f"layer {row_index}: module {name!r} is not supported; known modules: "
                         f"{', '.join(MODULES)}")
    return MODULES[name]


def _anchor_rows(anchors: Any, n_levels: int) -> list[list[float]]:
    """Anchors as L rows of 2*A pixel sizes; an int A means placeholders (values come from the state_dict)."""
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        if not 1 <= anchors <= MAX_ANCHORS:
            raise ValueError(f"anchors={anchors}: allowed is 1..{MAX_ANCHORS} anchors per level")
        return [list(range(anchors * 2))] * n_levels
    rows = [list(a) for a in anchors]
    if len(rows) != n_levels or any(len(r) != len(rows[0]) or len(r) % 2 or not r for r in rows):
        raise ValueError(f"anchors need {n_levels} rows (one per Detect input) of the same even length, "
                         f"got {anchors!r}")
    return rows


def _num_anchors(anchors: Any) -> int:
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        return anchors
    try:
        return len(anchors[0]) // 2
    except (TypeError, IndexError, KeyError):
        return 0


def _layer_args(cls: Callable[..., nn.Module], args: list[Any], n: int, f: Any, ch: list[int],
                width: float, no: int) -> tuple[list[Any], int, int]:
    """Constructor args, repeat count and output channels for one row (YOLOv5's parser rules)."""
    inputs = [f] if isinstance(f, int) else list(f)
    c_in = ch[inputs[0]]
    if cls in _CHANNEL_MODULES:
        c2 = args[0]
        if c2 != no:  # a conv that emits the detection outputs keeps its size
            c2 = make_divisible(c2 * width, 8)
        args = [c_in, c2, *args[1:]]
        if cls in _REPEAT_MODULES:
            args.insert(2, n)
            n = 1
        return args, n, c2
    if cls is _batchnorm_layer:
        return [c_in], n, c_in
    if cls is Concat:
        return args, n, sum(ch[x] for x in inputs)
    if cls is Detect:
        args = [args[0], _anchor_rows(args[1], len(inputs)), [ch[x] for x in inputs]]
        return args, n, c_in
    if cls is Contract:
        return args, n, c_in * args[0] ** 2
    if cls is Expand:
        return args, n, c_in // args[0] ** 2
    return args, n, c_in


def _check_from(f: Any, i: int) -> None:
    """``from`` must name earlier layers (or the input for layer 0): anything else would index garbage."""
    inputs = [f] if isinstance(f, int) and not isinstance(f, bool) else f
    if not isinstance(inputs, (list, tuple)) or not inputs or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
        raise ModelError(f"layer {i}: 'from' must be a layer index or a list of them, got {f!r}")
    for x in inputs:
        if x == -1 or (i > 0 and 0 <= x < i):
            continue
        if i > 0 and -i <= x < 0:  # other negative offsets count back from this layer
            continue
        raise ModelError(f"layer {i}: 'from' {x} does not name an earlier layer")


def _parse_rows(yaml: Mapping[str, Any], in_channels: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list and the sorted indices of layers whose output is reused."""
    depth, width = float(yaml["depth_multiple"]), float(yaml["width_multiple"])
    if not (0 < depth and math.isfinite(depth) and 0 < width and math.isfinite(width)):
        raise ModelError(f"depth_multiple={depth} / width_multiple={width}: allowed are finite numbers > 0")
    nc = int(yaml["nc"])
    no = _num_anchors(yaml["anchors"]) * (nc + 5)
    rows = list(yaml["backbone"]) + list(yaml["head"])
    if not rows or len(rows) > MAX_LAYERS:
        raise ModelError(f"the model yaml has {len(rows)} rows: allowed is 1..{MAX_LAYERS}")
    layers, save, ch = [], set(), [in_channels]
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ModelError(f"layer {i}: expected a row [from, number, module, args], got {row!r}")
        f, n, name, args = row
        cls = _module_class(name, i)
        _check_from(f, i)
        if not isinstance(args, (list, tuple)):
            raise ModelError(f"layer {i}: args must be a list, got {args!r}")
        try:
            args = [_resolve_arg(a, yaml) for a in args]
            n = max(round(n * depth), 1) if n > 1 else n
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_REPEATS:
                raise ValueError(f"number {n!r} after depth_multiple: allowed is 1..{MAX_REPEATS}")
            args, n, c2 = _layer_args(cls, args, n, f, ch, width, no)
            layer = nn.Sequential(*(cls(*args) for _ in range(n))) if n > 1 else cls(*args)
            save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        except (TypeError, IndexError, ValueError, KeyError, ZeroDivisionError, RuntimeError, OverflowError) as e:
            raise ModelError(f"layer {i}: cannot build {name} from row {list(row)!r}: {e!r}") from e
        if not isinstance(c2, int) or c2 < 1:
            raise ModelError(f"layer {i}: {name} would have {c2!r} output channels")
        layer.i, layer.f, layer.type = i, f, name
        layer.np = sum(p.numel() for p in layer.parameters())
        layers.append(layer)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def activation_factory(spec: Any) -> Callable[[], nn.Module] | None:
    """Factory for a yaml ``activation`` string such as 'nn.LeakyReLU(0.1)' (None: keep SiLU).

    Only the forms ``nn.<Name>()`` / ``nn.<Name>(<number>)`` with a name from ``ACTIVATIONS``.
    """
    if spec is None:
        return None
    match = _ACT_RE.match(str(spec))
    if not match or match.group(1) not in ACTIVATIONS:
        raise ModelError(f"activation {spec!r} is not supported; allowed: "
                         + ", ".join(f"nn.{k}({'<number>' if a else ''})" for k, (_, a) in ACTIVATIONS.items()))
    name, arg = match.groups()
    cls, takes_arg = ACTIVATIONS[name]
    if arg and not takes_arg:
        raise ModelError(f"activation {spec!r}: nn.{name} takes no argument here")
    if not arg:
        return cls
    try:
        value = float(arg)
    except ValueError:
        raise ModelError(f"activation {spec!r}: {arg!r} is not a number") from None
    return lambda: cls(value)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class DetectionModel(nn.Module):
    """A YOLOv5 detector built from its yaml dict.

    Attributes: ``model`` (nn.Sequential of layers, each with ``i``, ``f``, ``type``),
    ``yaml`` (dict), ``names`` (list[str]), ``save`` (indices of reused outputs),
    ``stride`` (tensor [L], e.g. [8., 16., 32.] or [8., 16., 32., 64.] for P6).

    forward(x [B, 3, H, W] float in [0, 1], H and W multiples of the max stride):
      eval  -> (pred [B, N, 5 + nc], raw list of [B, A, H_l, W_l, 5 + nc]);
      train -> raw list only.

    ``device="meta"`` builds the structure without tensor memory (see :func:`materialize`).
    """

    def __init__(self, yaml: Mapping[str, Any], nc: int | None = None, device: str | torch.device | None = None):
        super().__init__()
        self.yaml = copy.deepcopy(dict(yaml))
        if nc is not None:
            self.yaml["nc"] = nc
        n_cls = self.yaml.get("nc")
        if isinstance(n_cls, bool) or not isinstance(n_cls, int) or not 1 <= n_cls <= MAX_CLASSES:
            raise ModelError(f"nc={n_cls!r} is invalid: allowed is an integer in 1..{MAX_CLASSES}")
        for key in ("depth_multiple", "width_multiple", "anchors", "backbone", "head"):
            if key not in self.yaml:
                raise ModelError(f"the model yaml has no {key!r}")
        in_channels = self.yaml.get("ch", 3)
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or not 1 <= in_channels <= 64:
            raise ModelError(f"ch={in_channels!r} is invalid: allowed is an integer in 1..64 (image channels)")
        self.yaml["ch"] = in_channels
        act = activation_factory(self.yaml.get("activation"))
        meta = device is not None and torch.device(device).type == "meta"
        with torch.device(device) if device is not None else contextlib.nullcontext():
            with default_activation(act):
                self.model, self.save = _parse_rows(self.yaml, in_channels)
            if not isinstance(self.model[-1], Detect):
                raise ModelError("the last layer of a detection model must be Detect")
            self.names = [str(i) for i in range(self.yaml["nc"])]
            self.stride_values = self._measure_strides(in_channels)
            if not meta:
                self._init_anchors_and_biases()

    @property
    def stride(self) -> torch.Tensor:
        return self.model[-1].stride

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else \
                    [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    @torch.no_grad()
    def _measure_strides(self, in_channels: int) -> list[float]:
        """Strides from the output sizes for a zero image (eval mode: BN statistics untouched).
        Shapes only, so this also works on the meta device."""
        was_training = self.training
        self.eval()
        try:
            _, raw = self.forward(torch.zeros(1, in_channels, STRIDE_PROBE, STRIDE_PROBE))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise ModelError(f"the layers described by the yaml do not fit together: {e}") from e
        finally:
            self.train(was_training)
        return [STRIDE_PROBE / r.shape[2] for r in raw]

    @torch.no_grad()
    def _init_anchors_and_biases(self) -> None:
        """Stride buffer, anchors in stride units (order checked in pixels), prior biases for a
        fresh model: ~8 objects per 640 image, uniform class prior."""
        detect: Detect = self.model[-1]
        detect.stride.copy_(torch.tensor(self.stride_values))
        _check_anchor_order(detect)
        detect.anchors /= detect.stride.view(-1, 1, 1)
        for conv, s in zip(detect.m, self.stride_values):
            b = conv.bias.view(detect.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:] += math.log(0.6 / (detect.nc - 0.99999))


def _check_anchor_order(detect: Detect) -> None:
    """Flip the anchor levels when their mean area order disagrees with the stride order."""
    area = detect.anchors.prod(-1).mean(-1).view(-1)
    da, ds = area[-1] - area[0], detect.stride[-1] - detect.stride[0]
    if da and da.sign() != ds.sign():
        detect.anchors[:] = detect.anchors.flip(0)


def build_model(yaml: Mapping[str, Any], nc: int | None = None, *,
                device: str | torch.device | None = None) -> DetectionModel:
    """A freshly initialised ``DetectionModel`` (FP32, eval mode) from a model yaml dict.

    ``nc`` overrides the yaml's number of classes. ``device="meta"``: structure only, no
    tensor memory (parameter shapes are exact; call :func:`materialize` before use).
    """
    return DetectionModel(yaml, nc=nc, device=device).eval()


def materialize(model: DetectionModel, device: str | torch.device = "cpu") -> DetectionModel:
    """Give a meta-device model real (uninitialised) storage on ``device``, in place, and set
    its strides. Every persistent tensor must then be filled (a strict ``load_state_dict``)."""
    model.to_empty(device=device)
    model.model[-1].stride.copy_(torch.tensor(model.stride_values))
    return model


def model_yaml_path(name: str) -> Path:
    """Path of a bundled model yaml ('yolov5s' -> .../sweep/model/cfg/yolov5s.yaml)."""
    return Path(str(resources.files("sweep.model") / "cfg" / f"{name}.yaml"))


def load_model_yaml(name_or_path: str | Path) -> dict[str, Any]:
    """A model yaml dict: a bundled name ('yolov5n' ... 'yolov5x6') or a path to a yaml file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = model_yaml_path(str(name_or_path))
    if not path.is_file():
        bundled = sorted(p.stem for p in model_yaml_path("x").parent.glob("*.yaml"))
        raise ModelError(f"no model yaml {name_or_path!r}: give a file path or one of {', '.join(bundled)}")
    with open(path, encoding="utf-8") as fh:
        data = pyyaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a model yaml (expected a mapping)")
    return data


# ---------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------


def fuse(model: nn.Module) -> nn.Module:
    """Fold every Conv's BatchNorm into its conv, in place; returns ``model`` (in eval mode).

    The fused conv gets a bias; the ``bn`` attribute is deleted so forward skips it.
    Folding runs in the model's precision with val.py's formula (:func:`fused_conv`): call it on the FP32
    model, as val.py does, for val.py's weights.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, Conv) and "bn" in module._modules:
            module.conv = fused_conv(module.conv, module.bn)
            del module.bn
    return model


@torch.no_grad()
def fused_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` in eval mode, folded as val.py folds (in the conv's dtype).

    ``scale = gamma / sqrt(eps + var)``; weight rows ``diag(scale) @ W`` (a matrix product, as YOLOv5's
    ``fuse_conv_and_bn``); bias ``diag(scale) @ b + (beta - gamma * mean / sqrt(var + eps))``. The same
    operations in the same precision give val.py's fused weights bit for bit (float64 folding did not).
    """
    out = conv.out_channels
    w = conv.weight.detach()
    scale = bn.weight.div(torch.sqrt(bn.eps + bn.running_var))
    weight = torch.mm(torch.diag(scale), w.reshape(out, -1)).view(w.shape)
    b = torch.zeros(out, device=w.device, dtype=w.dtype) if conv.bias is None else conv.bias.detach()
    shift = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    bias = torch.mm(torch.diag(scale), b.reshape(-1, 1)).reshape(-1) + shift
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    return fused


def is_fused(model: nn.Module) -> bool:
    """True when no Conv of ``model`` still has a BatchNorm."""
    return not any(isinstance(m, Conv) and "bn" in m._modules for m in model.modules())


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as anchors and BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
