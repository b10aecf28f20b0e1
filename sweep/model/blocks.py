"""The layer modules a YOLOv5 model yaml can name, written from their definitions.

Every class keeps YOLOv5's attribute names (``conv``, ``bn``, ``act``, ``cv1``..``cv4``,
``m``, ``ma``, ``tr``...), constructor argument order and order of operations, so an
official state_dict loads with ``strict=True`` and the outputs are the same.

Conventions shared with YOLOv5: every BatchNorm2d of a model has eps 1e-3 and momentum 0.03
(YOLOv5 sets them on all of them after building); ``Conv(act=True)`` uses the model's
default activation (SiLU, or the yaml's ``activation``: see :func:`default_activation`),
``act=False`` means no activation, an ``nn.Module`` is used as given.

Tensor shape notation: B batch, C channels, H/W height/width.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03

# Factory of the activation that Conv(act=True) gets: set per model build (the yaml's
# ``activation`` key), never as global class state, so concurrent builds do not interfere.
_DEFAULT_ACT: contextvars.ContextVar[Callable[[], nn.Module]] = contextvars.ContextVar(
    "yolov5_default_act", default=nn.SiLU)


@contextlib.contextmanager
def default_activation(factory: Callable[[], nn.Module] | None) -> Iterator[None]:
    """Convs built inside this block with ``act=True`` get ``factory()`` (None: SiLU)."""
    token = _DEFAULT_ACT.set(factory or nn.SiLU)
    try:
        yield
    finally:
        _DEFAULT_ACT.reset(token)


def batchnorm(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None, d: int = 1):
    """'Same' padding for kernel ``k`` (dilation ``d``) unless ``p`` is given."""
    if p is not None:
        return p
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


# ---------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation.  [B, c1, H, W] -> [B, c2, H/s, W/s].

    After ``fuse()`` the ``bn`` attribute is gone and ``conv`` carries a bias.
    """

    def __init__(self, c1: int, c2: int, k: int | Sequence[int] = 1, s: int | Sequence[int] = 1,
                 p: int | Sequence[int] | None = None, g: int = 1, d: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = batchnorm(c2)
        if act is True:
            self.act = _DEFAULT_ACT.get()()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if "bn" in self._modules:
            x = self.bn(x)
        return self.act(x)


class DWConv(Conv):
    """Depth-wise Conv: groups = gcd(c1, c2) (fully depth-wise when c1 == c2)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act: bool | nn.Module = True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class DWConvTranspose2d(nn.ConvTranspose2d):
    """Depth-wise transposed conv (with bias, no BN): groups = gcd(c1, c2); ``p1`` padding, ``p2`` output padding."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p1: int = 0, p2: int = 0):
        super().__init__(c1, c2, k, s, p1, p2, groups=math.gcd(c1, c2))


class GhostConv(nn.Module):
    """Ghost convolution: half the outputs from ``cv1``, the other half a cheap 5x5 depth-wise
    conv of them.  [B, c1, H, W] -> [B, c2, H/s, W/s]."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool | nn.Module = True):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, k, s, None, g, act=act)
        self.cv2 = Conv(c_, c_, 5, 1, None, c_, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


class CrossConv(nn.Module):
    """(1 x k) Conv -> (k x 1) Conv, plus the input when ``shortcut`` and c1 == c2."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, e: float = 1.0,
                 shortcut: bool = False):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, (1, k), (1, s))
        self.cv2 = Conv(c_, c2, (k, 1), (s, 1), g=g)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class MixConv2d(nn.Module):
    """Mixed depth-wise conv (MixNet): parallel convs with kernels ``k`` splitting the c2 outputs,
    then BN and SiLU.  [B, c1, H, W] -> [B, c2, H/s, W/s].

    ``equal_ch``: the same number of outputs per kernel; otherwise outputs chosen so each
    kernel has about the same number of weights (least squares, rounded).
    """

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (1, 3), s: int = 1, equal_ch: bool = True):
        super().__init__()
        n = len(k)
        if equal_ch:  # output j goes to kernel floor(linspace(0, n - 1e-6, c2)[j])
            idx = torch.linspace(0, n - 1e-6, c2, device="cpu").floor()
            split = [int((idx == g).sum()) for g in range(n)]
        else:
            b = [c2] + [0] * n
            a = np.eye(n + 1, n, k=-1)
            a -= np.roll(a, 1, axis=1)
            a *= np.array(k) ** 2
            a[0] = 1
            split = [int(c) for c in np.linalg.lstsq(a, b, rcond=None)[0].round()]
        self.m = nn.ModuleList(nn.Conv2d(c1, c_, ks, s, ks // 2, groups=math.gcd(c1, c_), bias=False)
                               for ks, c_ in zip(k, split))
        self.bn = batchnorm(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(torch.cat([m(x) for m in self.m], 1)))


# ---------------------------------------------------------------------------------------
# Bottlenecks and CSP blocks
# ---------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 Conv -> 3x3 Conv, plus the input when ``shortcut`` and c1 == c2.  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class BottleneckCSP(nn.Module):
    """Original CSP bottleneck (YOLOv5 <= v3 heads).  [B, c1, H, W] -> [B, c2, H, W].

    Its own ``act`` (after the BN of the concatenation) is always SiLU, whatever the yaml's
    ``activation``: only Conv follows that key.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1)
        self.bn = batchnorm(2 * c_)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class C3(nn.Module):
    """CSP block with 3 convs: cv3(cat(m(cv1(x)), cv2(x))).  [B, c1, H, W] -> [B, c2, H, W].

    Subclasses differ only in the inner block ``m`` (built by ``_inner``).
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = self._inner(c_, n, shortcut, g)

    def _inner(self, c_: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3x(C3):
    """C3 with CrossConv blocks (k=3) as ``m``."""

    def _inner(self, c_: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return nn.Sequential(*(CrossConv(c_, c_, 3, 1, g, 1.0, shortcut) for _ in range(n)))


class C3Ghost(C3):
    """C3 with GhostBottlenecks as ``m``."""

    def _inner(self, c_: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return nn.Sequential(*(GhostBottleneck(c_, c_) for _ in range(n)))


class C3TR(C3):
    """C3 with a TransformerBlock (4 heads, n layers) as ``m``."""

    def _inner(self, c_: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return TransformerBlock(c_, c_, 4, n)


class C3SPP(C3):
    """C3 with an SPP(k) as ``m``. Its yaml args are (c2, k): no repeat count inside."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13), n: int = 1, shortcut: bool = True,
                 g: int = 1, e: float = 0.5):
        self._k = tuple(k)
        super().__init__(c1, c2, n, shortcut, g, e)

    def _inner(self, c_: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return SPP(c_, c_, self._k)


class GhostBottleneck(nn.Module):
    """GhostConv -> (stride-2: depth-wise Conv) -> GhostConv (no act), plus a shortcut
    (identity, or depth-wise Conv + 1x1 Conv when s == 2)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__()
        c_ = c2 // 2
        self.conv = nn.Sequential(
            GhostConv(c1, c_, 1, 1),
            DWConv(c_, c_, k, s, act=False) if s == 2 else nn.Identity(),
            GhostConv(c_, c2, 1, 1, act=False))
        self.shortcut = (nn.Sequential(DWConv(c1, c1, k, s, act=False), Conv(c1, c2, 1, 1, act=False))
                         if s == 2 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)


# ---------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------


class TransformerLayer(nn.Module):
    """Self-attention + a 2-layer linear MLP, each with a residual (no LayerNorm).  [S, B, c] -> [S, B, c]."""

    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.fc2 = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
        return self.fc2(self.fc1(x)) + x


class TransformerBlock(nn.Module):
    """Optional 1x1 Conv (c1 != c2), a learned position embedding (Linear) added to the pixels
    as a sequence, then ``num_layers`` TransformerLayers.  [B, c1, H, W] -> [B, c2, H, W]."""

    def __init__(self, c1: int, c2: int, num_heads: int, num_layers: int):
        super().__init__()
        self.conv = None if c1 == c2 else Conv(c1, c2)
        self.linear = nn.Linear(c2, c2)
        self.tr = nn.Sequential(*(TransformerLayer(c2, num_heads) for _ in range(num_layers)))
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        b, c, h, w = x.shape
        p = x.flatten(2).permute(2, 0, 1)  # [H*W, B, C]
        return self.tr(p + self.linear(p)).permute(1, 2, 0).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------
# Pooling, reshaping, concatenation
# ---------------------------------------------------------------------------------------


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


class Contract(nn.Module):
    """Width-height into channels: [B, C, H, W] -> [B, C*s*s, H/s, W/s] (s = ``gain``)."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.gain
        x = x.view(b, c, h // s, s, w // s, s)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()  # [B, s, s, C, H/s, W/s]
        return x.view(b, c * s * s, h // s, w // s)


class Expand(nn.Module):
    """Channels into width-height: [B, C, H, W] -> [B, C/s^2, H*s, W*s] (s = ``gain``)."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.gain
        x = x.view(b, s, s, c // s ** 2, h, w)
        x = x.permute(0, 3, 4, 1, 5, 2).contiguous()  # [B, C/s^2, H, s, W, s]
        return x.view(b, c // s ** 2, h * s, w * s)


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


# ---------------------------------------------------------------------------------------
# Detection head
# ---------------------------------------------------------------------------------------


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
