"""Pruning methods: exact counts, reproducibility, selection, ordering, channel removal.

Small random nets cover the generic behaviour; the real yolov5n (``yolov5n_path``) covers
what the issue pins on the real architecture.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sweep.config import ConfigError, PruneConfig
from sweep.cost import gflops, param_counts
from sweep.prune import (
    PRUNERS,
    apply_pruning,
    detect_head_convs,
    get_pruner,
    is_permanent,
    prune_model,
    select_convs,
)

UNSTRUCTURED = ["l1_unstructured", "global_l1", "random", "ln_structured"]


# --------------------------------------------------------------------------- toy nets


class Conv(nn.Module):
    """Conv + BN + SiLU like YOLOv5's, with a ``fuse`` step."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) if hasattr(self, "bn") else self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 1)
        self.cv2 = Conv(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C3ish(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_)
        self.cv2 = Conv(c1, c_)
        self.m = Bottleneck(c_)
        self.cv3 = Conv(2 * c_, c2)

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class Detect(nn.Module):
    """Two levels, 1x1 output convs in ``m`` and an ``anchors`` buffer, like YOLOv5's."""

    def __init__(self, chs: tuple[int, ...], no: int = 7, na: int = 2) -> None:
        super().__init__()
        self.no, self.na = no, na
        self.m = nn.ModuleList(nn.Conv2d(c, no * na, 1) for c in chs)
        self.register_buffer("anchors", torch.ones(len(chs), na, 2))

    def forward(self, xs):
        out = []
        for conv, x in zip(self.m, xs):
            y = conv(x)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h * w).permute(0, 1, 3, 2).reshape(b, -1, self.no))
        return torch.cat(out, 1).sigmoid()


class TinyYolo(nn.Module):
    """Stem, a C3-like block with concat and residual, two detection levels."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            Conv(3, 16, 3, 2),   # 0
            Conv(16, 32, 3, 2),  # 1
            C3ish(32, 32),       # 2
            Conv(32, 64, 3, 2),  # 3
            Detect((32, 64)),    # 4
        )

    def forward(self, x):
        x = self.model[0](x)
        x = self.model[1](x)
        p3 = self.model[2](x)
        p4 = self.model[3](p3)
        return self.model[4]([p3, p4])


def fuse_tiny(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            del m.bn
    return model


def make_tiny(seed: int = 0) -> TinyYolo:
    torch.manual_seed(seed)
    model = TinyYolo()
    for m in model.modules():  # non-trivial BN so fusion changes the weights
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def cfg(**kw) -> SimpleNamespace:
    base = dict(method="l1_unstructured", fused=True, include=[], exclude=[], seed=0, round_to=8)
    base.update(kw)
    return SimpleNamespace(**base)


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    return list(sd) == list(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


@pytest.fixture()
def tiny() -> TinyYolo:
    return make_tiny()


# --------------------------------------------------------------------------- selection


def test_select_all_convs_in_network_order(tiny):
    names = list(select_convs(tiny))
    expected = [n for n, m in tiny.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == expected and len(names) == 10
    assert names[-2:] == ["model.4.m.0", "model.4.m.1"]


@pytest.mark.parametrize("pattern", ["model.4.*", "model.4*", "model.4"])
def test_exclude_detect_head(tiny, pattern):
    names = list(select_convs(tiny, [], [pattern]))
    assert len(names) == 8 and not any(n.startswith("model.4") for n in names)


def test_include_one_layer_and_globs(tiny):
    assert list(select_convs(tiny, ["model.3.conv"], [])) == ["model.3.conv"]
    assert list(select_convs(tiny, ["model.2"], ["*.m.*"])) == [
        "model.2.cv1.conv", "model.2.cv2.conv", "model.2.cv3.conv"]
    assert list(select_convs(tiny, ["model.[01].*"], [])) == ["model.0.conv", "model.1.conv"]
    assert list(select_convs(tiny, "model.1.conv", None)) == ["model.1.conv"]


def test_include_typo_and_empty_selection_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="model.99"):
        select_convs(tiny, ["model.99.*"], [])
    with pytest.raises(ConfigError, match="select no Conv2d"):
        PRUNERS["l1_unstructured"](tiny, 0.3, cfg(include=["model.0.*"], exclude=["model.0*"]))


def test_detect_head_convs(tiny):
    assert detect_head_convs(tiny) == list(tiny.model[4].m)


def test_include_exclude_prune_only_selected(tiny):
    before = snapshot(tiny)
    PRUNERS["l1_unstructured"](tiny, 0.5, cfg(exclude=["model.4.*", "model.0*"]))
    for name, m in tiny.named_modules():
        if isinstance(m, nn.Conv2d):
            w0 = before[f"{name}.weight"]
            if name.startswith(("model.4", "model.0")):
                assert torch.equal(m.weight, w0), name
            else:
                assert zeros(m.weight) == round(0.5 * w0.numel()), name
    one = make_tiny()
    PRUNERS["ln_structured"](one, 0.5, cfg(include=["model.3.conv"]))
    assert [n for n, m in one.named_modules()
            if isinstance(m, nn.Conv2d) and zeros(m.weight)] == ["model.3.conv"]


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("amount", [0.1, 0.3, 0.5, 0.77, 0.9])
def test_l1_unstructured_exact_count_per_layer_and_smallest_magnitudes(amount):
    model = make_tiny()
    before = snapshot(model)
    PRUNERS["l1_unstructured"](model, amount, cfg())
    for name, m in select_convs(model).items():
        w0 = before[f"{name}.weight"]
        n = w0.numel()
        assert zeros(m.weight) == round(amount * n), name  # torch's rule, Python round
        pruned = m.weight == 0
        if pruned.any() and (~pruned).any():
            assert w0[pruned].abs().max() <= w0[~pruned].abs().min()
        assert torch.equal(m.weight[~pruned], w0[~pruned])  # survivors untouched


def test_round_half_to_even_is_torch_rule():
    conv = nn.Conv2d(1, 1, (1, 5), bias=False)  # 5 weights: 0.5*5 = 2.5 -> round() = 2
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 6.0).view(1, 1, 1, 5))
    net = nn.Sequential(conv)
    PRUNERS["l1_unstructured"](net, 0.5, cfg())
    assert zeros(conv.weight) == round(0.5 * 5) == 2


@pytest.mark.parametrize("amount", [0.2, 0.6])
def test_global_l1_global_count_and_single_threshold(tiny, amount):
    before = snapshot(tiny)
    PRUNERS["global_l1"](tiny, amount, cfg())
    sel = select_convs(tiny)
    total = sum(m.weight.numel() for m in sel.values())
    assert sum(zeros(m.weight) for m in sel.values()) == round(amount * total)
    w0 = torch.cat([before[f"{n}.weight"].flatten() for n in sel])
    mask = torch.cat([(m.weight == 0).flatten() for m in sel.values()])
    assert w0[mask].abs().max() <= w0[~mask].abs().min()
    per_layer = [zeros(m.weight) / m.weight.numel() for m in sel.values()]
    assert max(per_layer) - min(per_layer) > 0.05  # uneven, unlike per-layer pruning


def test_random_reproducible_by_seed_and_different_across_seeds():
    a = PRUNERS["random"](make_tiny(), 0.4, cfg(seed=1))
    b = PRUNERS["random"](make_tiny(), 0.4, cfg(seed=1))
    c = PRUNERS["random"](make_tiny(), 0.4, cfg(seed=2))
    assert same_state(a, snapshot(b))
    assert not same_state(a, snapshot(c))
    for name, m in select_convs(a).items():
        assert zeros(m.weight) == round(0.4 * m.weight.numel()), name


def test_random_leaves_global_rng_untouched_and_mask_independent_of_selection():
    model = make_tiny()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    full = PRUNERS["random"](model, 0.5, cfg(seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)
    only = PRUNERS["random"](make_tiny(), 0.5, cfg(seed=7, include=["model.3.conv"]))
    assert torch.equal(full.model[3].conv.weight == 0, only.model[3].conv.weight == 0)


def test_random_not_magnitude_based():
    model = make_tiny()
    before = snapshot(model)
    PRUNERS["random"](model, 0.5, cfg())
    w0 = before["model.2.cv3.conv.weight"]
    mask = model.model[2].cv3.conv.weight == 0
    assert w0[mask].abs().max() > w0[~mask].abs().min()


@pytest.mark.parametrize("amount", [0.25, 0.5, 0.7])
def test_ln_structured_zeroes_whole_filters(tiny, amount):
    before = snapshot(tiny)
    PRUNERS["ln_structured"](tiny, amount, cfg())
    for name, m in select_convs(tiny).items():
        w = m.weight.flatten(1)
        dead = (w == 0).all(dim=1)
        k = round(amount * m.out_channels)
        assert int(dead.sum()) == k, name
        assert zeros(m.weight) == k * w.shape[1], name  # nothing zeroed outside those filters
        norms = before[f"{name}.weight"].flatten(1).norm(dim=1)
        if 0 < k < m.out_channels:
            assert norms[dead].max() <= norms[~dead].min()


@pytest.mark.parametrize("method", list(PRUNERS))
def test_sparsity_zero_is_a_no_op(tiny, method):
    params = {n: p for n, p in tiny.named_parameters()}
    snap = snapshot(tiny)
    out = PRUNERS[method](tiny, 0.0, cfg())
    assert out is tiny and same_state(tiny, snap)
    assert all(p is params[n] for n, p in tiny.named_parameters())


@pytest.mark.parametrize("method", list(PRUNERS))
def test_pruning_a_copy_leaves_the_pristine_model_untouched(tiny, method):
    snap = snapshot(tiny)
    pruned = PRUNERS[method](copy.deepcopy(tiny), 0.5, cfg(exclude=["model.4.*"]))
    assert same_state(tiny, snap)
    assert not same_state(pruned, snap)


@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_masks_permanent_and_state_dict_keys_unchanged(tiny, method):
    keys = list(tiny.state_dict())
    fuse_tiny(tiny)  # convs with bias: prune re-registers weight after bias, order restored
    keys_fused = list(tiny.state_dict())
    PRUNERS[method](tiny, 0.3, cfg())
    assert is_permanent(tiny)
    assert list(tiny.state_dict()) == keys_fused
    assert not any(k.endswith(("_orig", "_mask")) for k in keys_fused + keys)
    assert all(isinstance(m.weight, nn.Parameter) for m in select_convs(tiny).values())


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.3", True])
def test_bad_sparsity_is_a_config_error(tiny, bad):
    with pytest.raises(ConfigError, match="sparsity"):
        PRUNERS["l1_unstructured"](tiny, bad, cfg())


def test_unknown_method_lists_registered_names(tiny):
    with pytest.raises(ConfigError) as err:
        get_pruner("l2_magic")
    for name in PRUNERS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="l1_unstructured"):
        prune_model(tiny, 0.3, cfg(method="nope"), fuse_tiny)


def test_registry_is_a_plain_dict_with_one_signature():
    assert type(PRUNERS) is dict
    assert set(PRUNERS) == {"l1_unstructured", "global_l1", "random", "ln_structured", "channel"}


def test_cfg_may_be_a_dataclass_a_dict_or_a_dictconfig(tiny):
    from omegaconf import OmegaConf

    for c in (PruneConfig(exclude=["model.4.*"]), {"exclude": ["model.4.*"]},
              OmegaConf.structured(PruneConfig(exclude=["model.4.*"]))):
        m = PRUNERS["l1_unstructured"](make_tiny(), 0.5, c)
        assert zeros(m.model[4].m[0].weight) == 0
        assert zeros(m.model[3].conv.weight) == round(0.5 * m.model[3].conv.weight.numel())


# --------------------------------------------------------------------------- fused / unfused order


def test_prune_model_order_and_recovery_between():
    calls: list[str] = []

    def fuse(m):
        calls.append("fuse")
        return fuse_tiny(m)

    def recover(m):
        calls.append("recover:" + ("fused" if not hasattr(m.model[0], "bn") else "unfused"))
        return m

    prune_model(make_tiny(), 0.3, cfg(fused=True), fuse, recover)
    assert calls == ["fuse", "recover:fused"]
    calls.clear()
    prune_model(make_tiny(), 0.3, cfg(fused=False), fuse, recover)
    assert calls == ["recover:unfused", "fuse"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_fused_and_unfused_both_reach_target(method, fused):
    model = prune_model(make_tiny(), 0.3, cfg(method=method, fused=fused), fuse_tiny)
    assert not any(hasattr(m, "bn") for m in model.modules())  # always ends fused
    for name, m in select_convs(model).items():
        n = m.weight.numel()
        expected = (round(0.3 * m.out_channels) * n // m.out_channels
                    if method == "ln_structured" else round(0.3 * n))
        if method == "global_l1":
            continue
        assert zeros(m.weight) == expected, name
    sel = select_convs(model).values()
    total = sum(m.weight.numel() for m in sel)
    assert abs(sum(zeros(m.weight) for m in sel) / total - 0.3) < 0.02


def test_fused_and_unfused_prune_different_weights():
    a = prune_model(make_tiny(), 0.3, cfg(fused=True), fuse_tiny)
    b = prune_model(make_tiny(), 0.3, cfg(fused=False), fuse_tiny)
    masks_a = [m.weight == 0 for m in select_convs(a).values()]
    masks_b = [m.weight == 0 for m in select_convs(b).values()]
    assert any(not torch.equal(x, y) for x, y in zip(masks_a, masks_b))


def test_apply_pruning_uses_cfg_method(tiny):
    apply_pruning(tiny, 0.5, cfg(method="ln_structured"))
    w = tiny.model[3].conv.weight.flatten(1)
    assert int((w == 0).all(dim=1).sum()) == 32


# --------------------------------------------------------------------------- channel (toy)


@pytest.mark.parametrize("fused", [True, False])
def test_channel_toy_removes_channels_keeps_outputs(fused):
    model = make_tiny()
    x = torch.randn(2, 3, 64, 64)
    y0 = model(x)
    p0, f0 = param_counts(model)[0], gflops(model, 64)
    model = prune_model(model, 0.5, cfg(method="channel", fused=fused), fuse_tiny)
    assert is_permanent(model)
    y = model(x)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    p1, f1 = param_counts(model)[0], gflops(model, 64)
    assert p1 < 0.6 * p0 and f1 < 0.6 * f0
    for name, m in select_convs(model).items():
        if m in detect_head_convs(model):
            assert m.out_channels == 14, name  # head outputs intact
        else:
            assert m.out_channels % 8 == 0 and m.out_channels >= 8, name


def test_channel_round_to_keeps_at_least_one_multiple():
    # 16 channels at 0.6: Torch-Pruning's floor would keep 16*0.4=6 -> 0 channels.
    model = channel_prune(make_tiny(), 0.6)
    assert model.model[0].conv.out_channels == 8
    model = channel_prune(make_tiny(), 0.3, round_to=1)
    assert model.model[0].conv.out_channels == int(16 * (1 - 0.3))  # 11 kept


def channel_prune(model, ratio, **kw):
    return PRUNERS["channel"](model, ratio, cfg(method="channel", **kw))


def test_channel_respects_exclude():
    model = channel_prune(make_tiny(), 0.5, exclude=["model.3*"])
    assert model.model[3].conv.out_channels == 64
    assert model.model[0].conv.out_channels == 8
