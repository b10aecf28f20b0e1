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

from sweep.config.schema import ConfigError
from sweep.config.spec import PruneSpec, RecoverSpec
from sweep.job import prune_and_recover
from sweep.model import fuse
from sweep.model.yolo import Conv
from sweep.prune.accounting import gflops, param_counts
from sweep.prune.methods import PRUNERS, detect_head_convs, is_permanent, select_convs
from sweep.recover import RECOVERERS

UNSTRUCTURED = ["l1_unstructured", "global_l1", "random", "ln_structured"]


# --------------------------------------------------------------------------- toy nets


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


fuse_tiny = fuse  # the toy nets use the real Conv, so the real fusion applies


def pruned(model: nn.Module, sparsity: float, spec: PruneSpec, recover: str = "none",
           calibration=None) -> nn.Module:
    """The job's own order (fuse -> prune, or prune -> recover -> fuse): ``sweep.job.prune_and_recover``."""
    return prune_and_recover(model, sparsity, spec, RecoverSpec(recover), calibration)[0]


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


def cfg(**kw) -> PruneSpec:
    base = dict(method="l1_unstructured", fused=True, include=(), exclude=(), seed=0, round_to=8)
    base.update(kw)
    return PruneSpec(**base)


def cfg_for(method: str, model: nn.Module, sparsity: float, **kw) -> PruneSpec:
    """``cfg(**kw)``, and for prune=sensitivity what the job's allocation stage hands it: per-layer counts
    (here ``round(sparsity * n)`` for every selected conv)."""
    spec = cfg(**kw)
    if method == "sensitivity":
        spec = cfg(**kw, allocation=tuple((n, round(sparsity * m.weight.numel()))
                                          for n, m in select_convs(model, spec.include, spec.exclude).items()))
    return spec


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
    pruned = PRUNERS[method](copy.deepcopy(tiny), 0.5, cfg_for(method, tiny, 0.5, exclude=["model.4.*"]))
    assert same_state(tiny, snap)
    assert not same_state(pruned, snap)


@pytest.mark.parametrize("method", [*UNSTRUCTURED, "lamp", "sensitivity"])
def test_masks_permanent_and_state_dict_keys_unchanged(tiny, method):
    keys = list(tiny.state_dict())
    fuse_tiny(tiny)  # convs with bias: prune re-registers weight after bias, order restored
    keys_fused = list(tiny.state_dict())
    PRUNERS[method](tiny, 0.3, cfg_for(method, tiny, 0.3))
    assert is_permanent(tiny)
    assert list(tiny.state_dict()) == keys_fused
    assert not any(k.endswith(("_orig", "_mask")) for k in keys_fused + keys)
    assert all(isinstance(m.weight, nn.Parameter) for m in select_convs(tiny).values())


def test_registry_is_a_plain_dict_with_one_signature():
    assert type(PRUNERS) is dict
    assert set(PRUNERS) == {"l1_unstructured", "global_l1", "lamp", "sensitivity", "random", "ln_structured",
                            "channel"}


# --------------------------------------------------------------------------- fused / unfused order


def test_prune_and_recover_order(monkeypatch):
    """fused: fuse -> prune; unfused: prune -> recover (on the BatchNorm layers) -> fuse."""
    seen: list[tuple[bool, float]] = []

    def probe(model, spec, calibration):  # a recoverer registered like any other
        w = model.model[3].conv.weight
        seen.append((hasattr(model.model[3], "bn"), float((w == 0).float().mean())))
        return {"probe": 1.0}

    monkeypatch.setitem(RECOVERERS, "probe", probe)
    model, metrics = prune_and_recover(make_tiny(), 0.3, cfg(fused=False), RecoverSpec("probe"), None)
    assert seen == [(True, pytest.approx(0.3, abs=0.01))] and metrics == {"probe": 1.0}
    assert not any(hasattr(m, "bn") for m in model.modules())  # fused after the recovery
    fused, metrics = prune_and_recover(make_tiny(), 0.3, cfg(fused=True), RecoverSpec(), None)
    assert metrics == {} and not any(hasattr(m, "bn") for m in fused.modules())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_fused_and_unfused_both_reach_target(method, fused):
    model = pruned(make_tiny(), 0.3, cfg(method=method, fused=fused))
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
    a = pruned(make_tiny(), 0.3, cfg(fused=True))
    b = pruned(make_tiny(), 0.3, cfg(fused=False))
    masks_a = [m.weight == 0 for m in select_convs(a).values()]
    masks_b = [m.weight == 0 for m in select_convs(b).values()]
    assert any(not torch.equal(x, y) for x, y in zip(masks_a, masks_b))


# --------------------------------------------------------------------------- channel (toy)


@pytest.mark.parametrize("fused", [True, False])
def test_channel_toy_removes_channels_keeps_outputs(fused):
    model = make_tiny()
    x = torch.randn(2, 3, 64, 64)
    y0 = model(x)
    p0, f0 = param_counts(model)[0], gflops(model, 64)
    model = pruned(model, 0.5, cfg(method="channel", fused=fused))
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


def test_channel_coupled_layers_follow_an_excluded_partner():
    # The residual add couples C3ish.cv1's outputs with the bottleneck's cv2 outputs: excluding
    # one of them keeps the whole coupled group; the uncoupled layers are still pruned.
    model = channel_prune(make_tiny(), 0.5, exclude=["model.4.*", "model.2.m.cv2*"])
    c3 = model.model[2]
    assert c3.cv1.conv.out_channels == c3.m.cv2.conv.out_channels == 16
    assert c3.m.cv1.conv.out_channels == 8 and c3.cv2.conv.out_channels == 8
    assert model(torch.zeros(1, 3, 32, 32)).shape == make_tiny()(torch.zeros(1, 3, 32, 32)).shape


# --------------------------------------------------------------------------- real yolov5n

COCO_IMAGE = "images/val2017/000000000139.jpg"  # living room: people, chairs, tv, plants...


# v5n / v5n_fused fixtures: tests/conftest.py


def _zero_counts(model: nn.Module) -> dict[str, int]:
    return {n: zeros(m.weight) for n, m in select_convs(model).items()}


def test_real_preexisting_zeros(v5n, v5n_fused):
    # The checkpoint (FP16) holds exactly one zero conv weight; fusion neither adds nor removes any.
    assert {k: v for k, v in _zero_counts(v5n).items() if v} == {"model.21.conv": 1}
    assert {k: v for k, v in _zero_counts(v5n_fused).items() if v} == {"model.21.conv": 1}
    assert len(select_convs(v5n)) == 60


@pytest.mark.parametrize("amount", [0.3, 0.9])
def test_real_l1_unstructured_exact_count_per_layer(v5n_fused, amount):
    model = copy.deepcopy(v5n_fused)
    z0 = _zero_counts(model)
    PRUNERS["l1_unstructured"](model, amount, cfg())
    for name, m in select_convs(model).items():
        # torch's rule: the round(amount*n) smallest |w| are zeroed; pre-existing zeros are
        # among them (|0| is smallest), so the count is max(round(amount*n), zeros before).
        assert zeros(m.weight) == max(round(amount * m.weight.numel()), z0[name]), name


def test_real_global_l1_global_count(v5n_fused):
    model = copy.deepcopy(v5n_fused)
    PRUNERS["global_l1"](model, 0.3, cfg())
    sel = select_convs(model)
    total = sum(m.weight.numel() for m in sel.values())
    assert total == 1_861_888  # conv weights of yolov5n (all 60 Conv2d)
    assert sum(zeros(m.weight) for m in sel.values()) == round(0.3 * total)
    per_layer = {n: zeros(m.weight) / m.weight.numel() for n, m in sel.items()}
    assert min(per_layer.values()) < 0.1 and max(per_layer.values()) > 0.5  # very uneven


def test_real_random_reproducible_and_seed_dependent(v5n_fused):
    a = PRUNERS["random"](copy.deepcopy(v5n_fused), 0.3, cfg(seed=0))
    b = PRUNERS["random"](copy.deepcopy(v5n_fused), 0.3, cfg(seed=0))
    c = PRUNERS["random"](copy.deepcopy(v5n_fused), 0.3, cfg(seed=1))
    masks = [[m.weight == 0 for m in select_convs(x).values()] for x in (a, b, c)]
    assert all(torch.equal(x, y) for x, y in zip(masks[0], masks[1]))
    assert all(not torch.equal(x, y) for x, y in zip(masks[0], masks[2]))


def test_real_ln_structured_zeroes_whole_filters(v5n_fused):
    model = PRUNERS["ln_structured"](copy.deepcopy(v5n_fused), 0.3, cfg())
    for name, m in select_convs(model).items():
        dead = (m.weight.flatten(1) == 0).all(dim=1)
        assert int(dead.sum()) == round(0.3 * m.out_channels), name


@pytest.mark.parametrize("method", ["l1_unstructured", "global_l1"])
def test_real_fused_and_unfused_both_reach_target(v5n, method):
    from sweep.prune.accounting import accounting
    results = {}
    for fused in (True, False):
        model = pruned(copy.deepcopy(v5n), 0.3, cfg(method=method, fused=fused))
        assert not any(hasattr(m, "bn") for m in model.modules())
        sel = select_convs(model)
        metrics, _ = accounting(model, list(sel), 64, 0.3)
        total = sum(m.weight.numel() for m in sel.values())
        if method == "l1_unstructured":
            expected = sum(round(0.3 * m.weight.numel()) for m in sel.values())
        else:
            expected = round(0.3 * total)
        assert metrics["sparsity"] == expected / total
        assert metrics["sparsity"] == pytest.approx(0.3, abs=1e-4)
        results[fused] = [m.weight == 0 for m in sel.values()]
    # BN folding scales each filter differently, so the two orders zero different weights.
    changed = sum(not torch.equal(x, y) for x, y in zip(results[True], results[False]))
    assert changed >= 50


def test_real_include_exclude(v5n_fused):
    model = PRUNERS["l1_unstructured"](copy.deepcopy(v5n_fused), 0.5, cfg(exclude=["model.24.*"]))
    counts = _zero_counts(model)
    assert [n for n in counts if n.startswith("model.24")] == ["model.24.m.0", "model.24.m.1", "model.24.m.2"]
    assert all(counts[f"model.24.m.{i}"] == 0 for i in range(3))
    assert all(v > 0 for n, v in counts.items() if not n.startswith("model.24"))
    one = PRUNERS["l1_unstructured"](copy.deepcopy(v5n_fused), 0.5, cfg(include=["model.3.conv"]))
    pruned = {n: v for n, v in _zero_counts(one).items() if v}
    assert pruned == {"model.3.conv": round(0.5 * 64 * 32 * 3 * 3), "model.21.conv": 1}  # + the old zero


def test_real_pristine_model_never_mutated(v5n):
    snap = snapshot(v5n)
    modules = dict(v5n.named_modules())
    for method, fused in [("l1_unstructured", True), ("ln_structured", False), ("channel", False)]:
        pruned(copy.deepcopy(v5n), 0.3, cfg(method=method, fused=fused))
    assert same_state(v5n, snap)
    assert dict(v5n.named_modules()).keys() == modules.keys()  # still unfused (bn present)
    assert all(a is b for a, b in zip(dict(v5n.named_modules()).values(), modules.values()))


def _image(val128_dir, size: int = 640) -> torch.Tensor:
    import cv2

    img = cv2.imread(str(val128_dir / COCO_IMAGE))[:, :, ::-1]
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def v5n_channel03(v5n):
    """yolov5n channel-pruned at ratio 0.3, fuse -> prune (the default order)."""
    return pruned(copy.deepcopy(v5n), 0.3, cfg(method="channel"))


def test_real_channel_reduces_cost_keeps_shapes(v5n_fused, v5n_channel03):
    from sweep.prune.accounting import gflops, param_counts

    model = v5n_channel03
    x = torch.zeros(1, 3, 320, 416)
    with torch.no_grad():
        pred0, raw0 = v5n_fused(x)
        pred, raw = model(x)
    assert pred.shape == pred0.shape == (1, 3 * (40 * 52 + 20 * 26 + 10 * 13), 85)
    assert [r.shape for r in raw] == [r.shape for r in raw0]
    heads = detect_head_convs(model)
    assert [c.out_channels for c in heads] == [255, 255, 255]
    # Measured on yolov5n (640x640): 1,867,405 -> 945,733 parameters (50.6%) and
    # 4.468 -> 2.330 GFLOPs (52.1%) at ratio 0.3: both in and out channels shrink (~0.7^2),
    # and rounding kept counts to multiples of 8 removes more than 30% of small layers.
    assert param_counts(v5n_fused)[0] == 1_867_405
    assert param_counts(model)[0] == 945_733
    assert gflops(model, 320) * 4 == pytest.approx(2.3297, abs=1e-3)
    assert gflops(v5n_fused, 320) * 4 == pytest.approx(4.4681, abs=1e-3)
    kept = [m.out_channels for m in select_convs(model).values() if m not in heads]
    assert all(c % 8 == 0 and c >= 8 for c in kept)
    assert model.model[0].conv.out_channels == 8 and model.model[23].cv3.conv.out_channels == 176


def test_real_channel_same_counts_fused_or_unfused(v5n, v5n_channel03):
    from sweep.prune.accounting import param_counts
    model = pruned(copy.deepcopy(v5n), 0.3, cfg(method="channel", fused=False))
    assert param_counts(model)[0] == param_counts(v5n_channel03)[0]  # counts depend on the ratio only
    shapes = [m.weight.shape for m in select_convs(model).values()]
    assert shapes == [m.weight.shape for m in select_convs(v5n_channel03).values()]


def test_real_channel_outputs_non_degenerate(v5n, val128_dir):
    """Channel pruning without any recovery hurts yolov5n badly; the outputs stay sane.

    Measured on 000000000139.jpg (640x640 resize): max objectness 0.881 dense, 0.161 after
    channel pruning at 0.2 (fuse->prune), 0.036 at 0.1: no box above 0.25 without recovery.
    """
    x = _image(val128_dir)
    model = pruned(copy.deepcopy(v5n), 0.2, cfg(method="channel"))
    with torch.no_grad():
        pred, _ = model(x)
    obj = pred[0, :, 4]
    assert torch.isfinite(pred).all()
    assert 0.1 < float(obj.max()) < 0.25
    assert float(obj.std()) > 1e-3
    top = pred[0, obj.topk(50).indices]
    assert len(top[:, 5:].argmax(1).unique()) > 1  # not one constant class everywhere
    wh = top[:, 2:4]
    assert (wh > 1).all() and (wh < 2000).all()


@pytest.mark.slow
def test_real_channel_detects_after_bn_recalibration(v5n, val128_dir, assets):
    """prune (unfused) -> BN recalibration on unlabeled calibration images -> fuse: detections return.

    Measured: 6 boxes with objectness > 0.25 on 000000000139.jpg at 0.2 (max 0.40) after
    recalibrating on the first 32 coco128-calib images; 0 without recalibration.
    """
    import cv2

    files = sorted((assets / "datasets" / "coco128-calib" / "images" / "train2017").glob("*.jpg"))[:32]
    calib = torch.cat([
        torch.from_numpy(cv2.resize(cv2.imread(str(f))[:, :, ::-1], (640, 640)).copy())
        .permute(2, 0, 1)[None].float() for f in files])  # 0-255, as calibration batches are
    images = SimpleNamespace(batches=lambda: calib.split(8), device=torch.device("cpu"), source="coco128-calib")
    model = pruned(copy.deepcopy(v5n), 0.2, cfg(method="channel", fused=False), "bn", images)
    with torch.no_grad():
        pred, _ = model(_image(val128_dir))
    assert int((pred[0, :, 4] > 0.25).sum()) >= 3


def test_channel_pruning_leaves_no_cyclic_garbage_behind(v5n):
    """Torch-Pruning's dependency graph leaves its nodes and dependencies in reference cycles: prune=channel
    frees them before returning, not whenever the collector next runs (the evaluation pauses it)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        model = PRUNERS["channel"](copy.deepcopy(v5n), 0.5, cfg(method="channel"))
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("torch_pruning")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == [] and model is not None
