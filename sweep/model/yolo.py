"""YOLOv5 P5 detection models, built from their own yaml description.

A model yaml (the dict an official checkpoint carries, or one of the files under
``sweep/cfg/``) has ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors`` and two
lists of rows ``[from, number, module, args]`` (``backbone`` then ``head``). Each row
becomes one layer of ``DetectionModel.model`` (an ``nn.Sequential``), so parameter names
are the official ones (``model.0.conv.weight``, ``model.24.m.0.weight``,
``model.24.anchors``) and an official state_dict loads with ``strict=True``.

Module names in the rows are looked up in the explicit table ``MODULES``; string
arguments are resolved explicitly (``nc``, ``anchors``, ``None``, ``True``, ``False``),
never evaluated.

Tensor shape notation: B batch, C channels, H/W height/width, A anchors per level,
N = sum over levels of A*H*W, K = 5 + nc.
"""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml as pyyaml
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

BN_EPS = 1e-3
BN_MOMENTUM = 0.03
STRIDE_PROBE = 256  # side of the zero image used to measure the output strides


class ModelError(ValueError):
    """A model yaml that cannot be built (unknown module, bad argument, ...)."""


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x`` (YOLOv5 channel rounding)."""
    return int(math.ceil(x / divisor) * divisor)


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None, d: int = 1):
    """'Same' padding for kernel ``k`` (dilation ``d``) unless ``p`` is given."""
    if p is not None:
        return p
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU.  [B, c1, H, W] -> [B, c2, H/s, W/s].

    After ``fuse()`` the ``bn`` attribute is gone and ``conv`` carries a bias.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, d: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act is True:
            self.act = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if "bn" in self._modules:
            x = self.bn(x)
        return self.act(x)


class Bottleneck(nn.Module):
    """1x1 Conv -> 3x3 Conv, plus the input when ``shortcut`` and c1 == c2.  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with 3 convs: cv3(cat(m(cv1(x)), cv2(x))).  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class BottleneckCSP(nn.Module):
    """Original CSP bottleneck (YOLOv5 <= v3 heads).  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1)
        self.bn = nn.BatchNorm2d(2 * c_, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools of sizes ``k`` (v5.0).  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP: one max-pool of size ``k`` applied three times in series.  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Focus(nn.Module):
    """Space-to-depth (2x2 pixel blocks to channels) then Conv (v5.0 stem).  [B, c1, H, W] -> [B, c2, H/2/s, W/2/s]."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(parts, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """Anchor-based detection head: one 1x1 conv per level with A*(5+nc) outputs.

    Buffers: ``anchors`` [L, A, 2] in units of the level's stride (as stored in official
    checkpoints); ``stride`` [L] (not persistent, so not in the state_dict).

    forward(list of L maps [B, C_l, H_l, W_l]):
      train mode -> list of L raw maps [B, A, H_l, W_l, K] (logits);
      eval mode  -> (pred [B, N, K], raw list) where pred rows are ordered level, anchor,
                    y, x and hold xywh in input pixels, sigmoid objectness, sigmoid class
                    probabilities.
    """

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = ()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]):
        raw = []
        for i, conv in enumerate(self.m):
            p = conv(xs[i])
            bs, _, ny, nx = p.shape
            raw.append(p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return torch.cat([self._decode(p, i) for i, p in enumerate(raw)], 1), raw

    def _decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """Raw level-i map [B, A, H, W, K] -> boxes [B, A*H*W, K] (xywh pixels, probabilities)."""
        bs, na, ny, nx, no = p.shape
        y = p.sigmoid()
        grid, anchor_grid = self._grids(i, ny, nx, p.dtype, p.device)
        xy = (y[..., 0:2] * 2 + grid) * self.stride[i].to(p.dtype)
        wh = (y[..., 2:4] * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, y[..., 4:]), -1).view(bs, na * ny * nx, no)

    def _grids(self, i: int, ny: int, nx: int, dtype: torch.dtype, device: torch.device):
        """Cell offsets minus 0.5 [1, A, H, W, 2] (x, y) and anchor sizes in pixels [1, A, 1, 1, 2]."""
        yv, xv = torch.meshgrid(torch.arange(ny, device=device, dtype=dtype),
                                torch.arange(nx, device=device, dtype=dtype), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).to(dtype).view(1, self.na, 1, 1, 2)
        return grid, anchor_grid


# Explicit yaml module name -> class table. Nothing outside this table can be built.
MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "BottleneckCSP": BottleneckCSP,
    "SPP": SPP,
    "SPPF": SPPF,
    "Focus": Focus,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
    "nn.Identity": nn.Identity,
}

# Modules whose first two constructor arguments are (c_in, c_out): args[0] in the yaml is c_out.
_CHANNEL_MODULES = (Conv, Bottleneck, C3, BottleneckCSP, SPP, SPPF, Focus)
# Modules that take the repeat count as their third argument instead of being repeated.
_REPEAT_MODULES = (C3, BottleneckCSP)

# Activation names allowed in a yaml's optional ``activation`` key (e.g. "nn.LeakyReLU(0.1)").
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": nn.Hardswish,
    "Sigmoid": nn.Sigmoid,
    "Identity": nn.Identity,
}
_ACT_RE = re.compile(r"^\s*(?:torch\.)?(?:nn\.)?(\w+)\(\s*([-+0-9.eE]*)\s*\)\s*$")
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


def _module_class(name: Any, row_index: int) -> type[nn.Module]:
    if not isinstance(name, str) or name not in MODULES:
        raise ModelError(f"layer {row_index}: module {name!r} is not supported; known modules: "
                         f"{', '.join(sorted(MODULES))}")
    return MODULES[name]


def _anchor_rows(anchors: Any, n_levels: int) -> list[list[float]]:
    """Anchors as L rows of 2*A pixel sizes; an int A means placeholders (values come from the state_dict)."""
    if isinstance(anchors, int):
        return [list(range(anchors * 2))] * n_levels
    return [list(a) for a in anchors]


def _layer_args(cls: type[nn.Module], args: list[Any], n: int, f: Any, ch: list[int],
                width: float, nc: int) -> tuple[list[Any], int, int]:
    """Constructor args, repeat count and output channels for one row (YOLOv5 rules)."""
    inputs = [f] if isinstance(f, int) else list(f)
    if cls in _CHANNEL_MODULES:
        c1, c2 = ch[inputs[0]], args[0]
        if c2 != nc + 5:
            c2 = make_divisible(c2 * width, 8)
        args = [c1, c2, *args[1:]]
        if cls in _REPEAT_MODULES:
            args.insert(2, n)
            n = 1
        return args, n, c2
    if cls is Concat:
        return args, n, sum(ch[x] for x in inputs)
    if cls is Detect:
        args = [args[0], _anchor_rows(args[1], len(inputs)), [ch[x] for x in inputs]]
        return args, n, ch[inputs[0]]
    return args, n, ch[inputs[0]]


def _parse_rows(yaml: Mapping[str, Any], in_channels: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list and the sorted indices of layers whose output is reused."""
    depth, width = float(yaml["depth_multiple"]), float(yaml["width_multiple"])
    nc = int(yaml["nc"])
    rows = list(yaml["backbone"]) + list(yaml["head"])
    layers, save, ch = [], set(), [in_channels]
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ModelError(f"layer {i}: expected a row [from, number, module, args], got {row!r}")
        f, n, name, args = row
        cls = _module_class(name, i)
        try:
            args = [_resolve_arg(a, yaml) for a in args]
            n = max(round(n * depth), 1) if n > 1 else n
            args, n, c2 = _layer_args(cls, args, n, f, ch, width, nc)
            layer = nn.Sequential(*(cls(*args) for _ in range(n))) if n > 1 else cls(*args)
            save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        except (TypeError, IndexError, ValueError, KeyError, ZeroDivisionError) as e:
            raise ModelError(f"layer {i}: cannot build {name} from row {list(row)!r}: {e!r}") from e
        layer.i, layer.f, layer.type = i, f, name
        layer.np = sum(p.numel() for p in layer.parameters())
        layers.append(layer)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def _activation(spec: Any) -> nn.Module | None:
    """Module for a yaml ``activation`` string such as 'nn.LeakyReLU(0.1)' (None: keep SiLU)."""
    if spec is None:
        return None
    match = _ACT_RE.match(str(spec))
    if not match or match.group(1) not in ACTIVATIONS:
        raise ModelError(f"activation {spec!r} is not supported; known: {', '.join(sorted(ACTIVATIONS))}")
    name, arg = match.groups()
    return ACTIVATIONS[name](float(arg)) if arg else ACTIVATIONS[name]()


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class DetectionModel(nn.Module):
    """A YOLOv5 detector built from its yaml dict.

    Attributes: ``model`` (nn.Sequential of layers, each with ``i``, ``f``, ``type``),
    ``yaml`` (dict), ``names`` (list[str]), ``save`` (indices of reused outputs),
    ``stride`` (tensor [L], e.g. [8., 16., 32.]).

    forward(x [B, 3, H, W] float in [0, 1], H and W multiples of the max stride):
      eval  -> (pred [B, N, 5 + nc], raw list of [B, A, H_l, W_l, 5 + nc]);
      train -> raw list only.
    """

    def __init__(self, yaml: Mapping[str, Any], nc: int | None = None):
        super().__init__()
        self.yaml = copy.deepcopy(dict(yaml))
        if nc is not None:
            self.yaml["nc"] = nc
        if isinstance(self.yaml.get("nc"), bool) or not isinstance(self.yaml.get("nc"), int) \
                or self.yaml["nc"] < 1:
            raise ModelError(f"nc={self.yaml.get('nc')!r} is invalid: allowed is an integer >= 1")
        for key in ("depth_multiple", "width_multiple", "anchors", "backbone", "head"):
            if key not in self.yaml:
                raise ModelError(f"the model yaml has no {key!r}")
        in_channels = int(self.yaml.get("ch", 3))
        self.yaml["ch"] = in_channels
        self.model, self.save = _parse_rows(self.yaml, in_channels)
        if not isinstance(self.model[-1], Detect):
            raise ModelError("the last layer of a detection model must be Detect")
        self.names = [str(i) for i in range(self.yaml["nc"])]
        act = _activation(self.yaml.get("activation"))
        if act is not None:
            _replace_activations(self, act)
        self._init_strides(in_channels)
        self._init_detect_biases()

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
    def _init_strides(self, in_channels: int) -> None:
        """Measure strides with a zero image (eval mode: BN statistics untouched); anchors -> stride units."""
        detect: Detect = self.model[-1]
        was_training = self.training
        self.eval()
        try:
            _, raw = self.forward(torch.zeros(1, in_channels, STRIDE_PROBE, STRIDE_PROBE))
        finally:
            self.train(was_training)
        detect.stride.copy_(torch.tensor([STRIDE_PROBE / r.shape[2] for r in raw]))
        detect.anchors /= detect.stride.view(-1, 1, 1)
        _check_anchor_order(detect)

    @torch.no_grad()
    def _init_detect_biases(self) -> None:
        """Prior biases for a fresh model: ~8 objects per 640 image, uniform class prior."""
        detect: Detect = self.model[-1]
        for conv, s in zip(detect.m, detect.stride.tolist()):
            b = conv.bias.view(detect.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:] += math.log(0.6 / (detect.nc - 0.99))


def _check_anchor_order(detect: Detect) -> None:
    """Flip the anchor levels when their area order disagrees with the stride order."""
    area = detect.anchors.prod(-1).mean(-1).view(-1)
    da, ds = area[-1] - area[0], detect.stride[-1] - detect.stride[0]
    if da and da.sign() != ds.sign():
        detect.anchors[:] = detect.anchors.flip(0)


def _replace_activations(model: nn.Module, act: nn.Module) -> None:
    """Use ``act`` (a copy per layer) instead of the default SiLU everywhere."""
    for module in model.modules():
        if isinstance(module, (Conv, BottleneckCSP)) and isinstance(module.act, nn.SiLU):
            module.act = copy.deepcopy(act)


def build_model(yaml: Mapping[str, Any], nc: int | None = None) -> DetectionModel:
    """A freshly initialised ``DetectionModel`` (FP32, eval mode) from a model yaml dict.

    ``nc`` overrides the yaml's number of classes.
    """
    return DetectionModel(yaml, nc=nc).eval()


def model_yaml_path(name: str) -> Path:
    """Path of a bundled model yaml ('yolov5s' -> .../sweep/cfg/yolov5s.yaml)."""
    return Path(str(resources.files("sweep.model") / "cfg" / f"{name}.yaml"))


def load_model_yaml(name_or_path: str | Path) -> dict[str, Any]:
    """A model yaml dict: a bundled name ('yolov5n' ... 'yolov5x') or a path to a yaml file."""
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
    Folding runs in float64 (torch's ``fuse_conv_bn_weights``) so a half or float model
    loses no precision to the folding itself.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, Conv) and "bn" in module._modules:
            module.conv = fused_conv(module.conv, module.bn)
            del module.bn
    return model


@torch.no_grad()
def fused_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` in eval mode (weights folded in float64, cast back)."""
    weight, bias = fuse_conv_bn_weights(
        conv.weight.double(), None if conv.bias is None else conv.bias.double(),
        bn.running_mean.double(), bn.running_var.double(), bn.eps,
        None if bn.weight is None else bn.weight.double(), None if bn.bias is None else bn.bias.double())
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return fused


def is_fused(model: nn.Module) -> bool:
    """True when no Conv of ``model`` still has a BatchNorm."""
    return not any(isinstance(m, Conv) and "bn" in m._modules for m in model.modules())


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as anchors and BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
