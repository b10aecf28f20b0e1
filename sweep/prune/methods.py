"""Pruning methods: a plain name -> function registry with one signature.

Every entry of :data:`PRUNERS` is ``fn(model, sparsity, spec: PruneSpec) -> model``:

- ``model`` is pruned **in place** (the caller hands a fresh ``copy.deepcopy`` of the
  pretrained model; nothing here copies it) and returned. ``channel`` also works in place
  (Torch-Pruning rewrites the layers of the same module tree).
- ``sparsity`` is a number in [0, 1), already checked and normalised by the job spec; 0 is a
  no-op for every method (the model is returned untouched, not even re-parametrised).
- ``spec`` is the job's :class:`sweep.config.spec.PruneSpec`; the fields read are ``include``,
  ``exclude`` (glob patterns over module names, see :func:`select_convs`), ``seed``
  (``random``), ``round_to`` (``channel``) and ``allocation`` (``sensitivity``: per-layer zero
  counts, filled in by the job from the measured curves).

Masks are always made permanent (``torch.nn.utils.prune.remove``) before a function
returns, so the model carries plain ``weight`` parameters with exact zeros.

Methods (what they zero or remove, and what speed-up to expect):

``l1_unstructured``
    The YOLOv5 tutorial's method: in every selected Conv2d, the ``round(sparsity * n)``
    weights of smallest magnitude are set to zero (``prune.l1_unstructured``). Dense
    zeros: no speed-up and the same file size; only compression benefits.
``global_l1``
    One L1 threshold over all selected Conv2d weights together
    (``prune.global_unstructured``): ``round(sparsity * N_total)`` zeros in all, unevenly
    spread (layers with small weights lose more). Dense zeros: no speed-up.
``lamp``
    Layer-adaptive magnitude pruning (Lee et al., ICLR 2021): each weight's score is its
    squared magnitude over the sum of squares of the weights of its layer at least as large
    (itself included), see :func:`lamp_scores`; then the ``round(sparsity * N_total)``
    lowest scores over all selected layers are zeroed (ties: network order, then flat index).
    A layer keeps its largest weight (score 1), unless k weights share that magnitude (each then
    scores 1/k, and all can go at very high sparsity). Dense zeros: no speed-up.
``sensitivity``
    Per-layer counts allocated from label-free sensitivity curves
    (:mod:`sweep.prune.sensitivity`): the job measures how much the Detect output moves when
    each layer alone is L1-pruned at ``spec.levels`` on calibration images, then chooses the
    per-layer zero counts that reach ``round(sparsity * N_total)`` exactly with the least
    total distortion and hands them over as ``spec.allocation``; here each selected conv loses
    its allocated count of smallest-magnitude weights (``prune.l1_unstructured`` with an integer
    count). Dense zeros: no speed-up.
``random``
    ``round(sparsity * n)`` weights per selected layer chosen uniformly at random
    (``prune.random_unstructured``), seeded from ``spec.seed`` and the layer name (a
    layer's mask does not depend on which other layers are selected). The baseline.
``ln_structured``
    Whole output filters: per selected layer, the ``round(sparsity * out_channels)``
    filters of smallest L2 norm are zeroed (``prune.ln_structured``, n=2, dim=0). The
    tensors keep their shape (zeros are dense): no speed-up. The channel still emits its
    bias (fused) or its BatchNorm shift (unfused), so it becomes a constant, not a zero.
``channel``
    Physical removal of output channels with Torch-Pruning's DepGraph
    (``torch_pruning.pruner.BasePruner``, ``MagnitudeImportance(p=2)``, local ratio
    ``sparsity`` per layer group, channel counts rounded to multiples of ``spec.round_to``,
    at least ``round_to`` channels kept). The Detect head's output convolutions are never
    pruned (outputs keep ``no = 5 + nc`` per anchor), nor are unselected layers or the
    layers coupled with them (e.g. both sides of a residual add).
    Tensors really shrink: fewer parameters, FLOPs, bytes and lower latency (in and out
    channels both shrink, so cost falls roughly with the square of the kept ratio; figures in
    the README). Without recovery accuracy collapses; ``prune.fused=false`` plus BatchNorm
    recalibration or fine-tuning (``recover``) brings detections back.

Fused vs unfused order (``spec.fused``) is the job's (``sweep.job.prune_and_recover``): ``fuse ->
prune`` (the tutorial: the zeros are placed in the BN-folded weights) or ``prune -> recover ->
fuse`` (the raw conv weights are pruned; zeros survive fusion because folding BN only scales each
output filter).
"""

from __future__ import annotations

import fnmatch
import gc
import logging
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune
import torch_pruning as tp

from sweep.config.schema import ConfigError
from sweep.config.spec import PruneSpec

logger = logging.getLogger(__name__)

PrunerFn = Callable[[nn.Module, float, PruneSpec], nn.Module]

# The example input Torch-Pruning traces the graph with (a multiple of every YOLOv5 stride).
CHANNEL_EXAMPLE_SHAPE = (1, 3, 256, 256)


# --------------------------------------------------------------------------- config access


def _patterns(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, Iterable):
        raise ConfigError(f"prune.{key}={value!r} is invalid: allowed is a list of glob patterns")
    return [str(v) for v in value]


# --------------------------------------------------------------------------- selection


def _matches(name: str, patterns: list[str]) -> bool:
    """True when ``name`` or one of its ancestors (dotted prefixes) matches a pattern.

    So ``model.24`` selects every conv inside layer 24, as ``model.24.*`` and ``model.24*``
    do (the latter also ``model.240``...), and ``model.3.conv`` selects that one conv.
    """
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def select_convs(
    model: nn.Module, include: Any = (), exclude: Any = ()
) -> "OrderedDict[str, nn.Conv2d]":
    """The ``nn.Conv2d`` modules to prune, by name, in network (registration) order.

    ``include`` empty selects every Conv2d (the tutorial); otherwise a conv is selected when
    its name, or the name of a module containing it, matches one of the ``fnmatch`` glob
    patterns (case-sensitive). ``exclude`` then removes the convs matched the same way.
    Examples on YOLOv5: ``exclude=["model.24.*"]`` leaves the Detect head dense,
    ``include=["model.3.conv"]`` selects one layer, ``include=["model.1?.*"]`` layers 10-19.

    Raises ConfigError when an include pattern matches no Conv2d (a typo would otherwise
    silently turn the job into a no-op); an unmatched exclude pattern only logs a warning.
    """
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for pat in inc:
        if not any(_matches(n, [pat]) for n, _ in convs):
            raise ConfigError(
                f"prune.include pattern {pat!r} matches no Conv2d: allowed is a glob over module "
                f"names such as {', '.join(repr(n) for n, _ in convs[:3])}"
            )
    for pat in exc:
        if not any(_matches(n, [pat]) for n, _ in convs):
            logger.warning("prune.exclude pattern %r matches no Conv2d", pat)
    selected = OrderedDict()
    for name, m in convs:
        if inc and not _matches(name, inc):
            continue
        if exc and _matches(name, exc):
            continue
        selected[name] = m
    return selected


def _selection(model: nn.Module, spec: PruneSpec) -> "OrderedDict[str, nn.Conv2d]":
    selected = select_convs(model, spec.include, spec.exclude)
    if not selected:
        raise ConfigError(
            f"prune.include={list(spec.include)!r} / prune.exclude={list(spec.exclude)!r} select no "
            "Conv2d: allowed is a selection of at least one layer"
        )
    return selected


def detect_head_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The output convolutions of every YOLOv5 ``Detect``-like module (``m`` list + ``anchors``)."""
    heads: list[nn.Conv2d] = []
    for mod in model.modules():
        is_detect = type(mod).__name__ in ("Detect", "Segment") or (
            hasattr(mod, "anchors") and isinstance(getattr(mod, "m", None), nn.ModuleList)
        )
        if is_detect and isinstance(getattr(mod, "m", None), nn.ModuleList):
            heads.extend(c for c in mod.m if isinstance(c, nn.Conv2d))
    return heads


# --------------------------------------------------------------------------- helpers


def _param_order(module: nn.Module) -> list[str]:
    return list(module._parameters)


def _make_permanent(module: nn.Module, order: list[str], name: str = "weight") -> None:
    """``prune.remove``, then restore the parameter order recorded before pruning.

    ``prune`` re-registers ``weight`` after ``bias``; restoring the order keeps the state_dict
    key order identical to the dense model's.
    """
    tprune.remove(module, name)
    module._parameters = OrderedDict((k, module._parameters[k]) for k in order)


def is_permanent(model: nn.Module) -> bool:
    """True when no ``torch.nn.utils.prune`` re-parametrisation is left on any module."""
    for m in model.modules():
        if any(isinstance(h, tprune.BasePruningMethod) for h in m._forward_pre_hooks.values()):
            return False
        if any(k.endswith("_mask") for k in m._buffers):
            return False
    return True


def _layer_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed only the generator of ``device`` and restore every generator state afterwards."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[idx], device_type="cuda"):
            torch.cuda.default_generators[idx].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


# --------------------------------------------------------------------------- methods


def _per_layer(model: nn.Module, sparsity: float, spec: PruneSpec,
               prune_one: Callable[[str, nn.Conv2d, float], None]) -> nn.Module:
    """Apply ``prune_one(name, conv, sparsity)`` to every selected conv, then make its mask permanent."""
    if sparsity == 0:
        return model
    for name, m in _selection(model, spec).items():
        order = _param_order(m)
        prune_one(name, m, sparsity)
        _make_permanent(m, order)
    return model


@torch.no_grad()
def l1_unstructured(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """Per-layer L1 magnitude (the tutorial): ``round(sparsity * n)`` zeros in each selected conv."""
    return _per_layer(model, sparsity, spec, lambda _, m, s: tprune.l1_unstructured(m, "weight", amount=s))


@torch.no_grad()
def global_l1(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """One global L1 threshold: ``round(sparsity * N)`` zeros over all selected conv weights."""
    if sparsity == 0:
        return model
    convs = list(_selection(model, spec).values())
    orders = [_param_order(m) for m in convs]
    tprune.global_unstructured(
        [(m, "weight") for m in convs], pruning_method=tprune.L1Unstructured, amount=sparsity
    )
    for m, order in zip(convs, orders):
        _make_permanent(m, order)
    return model


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer's weights, same shape as ``weight`` (any shape, float).

    ``score = w**2 / sum of u**2 over the layer's weights u with |u| >= |w|`` (itself included, so
    equal magnitudes share one denominator and one score). The largest weight scores 1; zeros
    score 0; within a layer the order of scores is the order of magnitudes.
    """
    sq = weight.detach().flatten().double() ** 2  # float64: suffix sums over ~1e6 squares stay exact enough
    order = torch.argsort(sq, stable=True)
    s = sq[order]
    suffix = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # suffix[i] = sum(s[i:])
    # equal magnitudes: every member of a tie group takes the suffix sum from the group's first index
    _, counts = torch.unique_consecutive(s, return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    denom = suffix[first]
    scores = torch.where(denom > 0, s / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(s))
    out = torch.empty_like(scores)
    out[order] = scores
    return out.view_as(weight).to(weight.dtype)


def lowest_mask(scores: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Masks (1 keep, 0 prune; shapes of ``scores``) zeroing the ``count`` lowest scores over all tensors.

    Ties are broken by position (tensor order, then flat index: a stable sort), so the result is the same
    on every run and device; ``torch.topk``, which ``prune.global_unstructured`` uses, leaves that open.
    """
    flat = torch.cat([s.detach().flatten().double() for s in scores])
    mask = torch.ones_like(flat)
    mask[torch.argsort(flat, stable=True)[:count]] = 0
    out, start = [], 0
    for s in scores:
        out.append(mask[start:start + s.numel()].view_as(s).to(s.dtype))
        start += s.numel()
    return out


@torch.no_grad()
def lamp(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """LAMP: ``round(sparsity * N)`` zeros over all selected conv weights, lowest LAMP score first."""
    if sparsity == 0:
        return model
    convs = list(_selection(model, spec).values())
    total = sum(m.weight.numel() for m in convs)
    masks = lowest_mask([lamp_scores(m.weight) for m in convs], round(sparsity * total))  # torch's rounding
    for m, mask in zip(convs, masks):
        order = _param_order(m)
        tprune.custom_from_mask(m, "weight", mask)
        _make_permanent(m, order)
    return model


@torch.no_grad()
def sensitivity(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """Per-layer L1 with the counts of ``spec.allocation`` (``(layer, zeros)`` pairs for every selected conv)."""
    if sparsity == 0:
        return model
    selected = _selection(model, spec)
    counts = dict(spec.allocation)
    if set(counts) != set(selected):
        raise ValueError("prune=sensitivity needs spec.allocation for exactly the selected layers (the job's "
                         f"allocation stage fills it): got {len(counts)} layers for {len(selected)} selected")
    for name, m in selected.items():
        order = _param_order(m)
        tprune.l1_unstructured(m, "weight", amount=int(counts[name]))  # an int amount is a count
        _make_permanent(m, order)
    return model


@torch.no_grad()
def random(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """Random unstructured: ``round(sparsity * n)`` random zeros per selected conv, seeded.

    Each layer's mask comes from a generator seeded with ``(spec.seed, layer name)``; the
    global RNG state is saved and restored, so nothing leaks to the caller. Masks are
    reproducible for a given seed and device type (CPU and CUDA generators differ).
    """
    seed = spec.seed

    def one(name: str, m: nn.Conv2d, s: float) -> None:
        with _seeded(m.weight.device, _layer_seed(seed, name)):
            tprune.random_unstructured(m, "weight", amount=s)

    return _per_layer(model, sparsity, spec, one)


@torch.no_grad()
def ln_structured(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """Zero the ``round(sparsity * out_channels)`` output filters of smallest L2 norm per conv."""
    return _per_layer(model, sparsity, spec, lambda _, m, s: tprune.ln_structured(m, "weight", amount=s, n=2, dim=0))


def _channel_pruner_class(round_to: int) -> type:
    class _RoundedPruner(tp.pruner.BasePruner):
        """BasePruner whose ``round_to`` rounds the KEPT channel count to the nearest multiple
        (at least one multiple, never more than the layer had) instead of flooring it:
        Torch-Pruning's floor removes a 16-channel layer entirely at ratio 0.6 (16*0.4=6 -> 0)."""

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            kept = current_channels - n_pruned
            kept = int((kept / round_to) + 0.5) * round_to
            kept = min(max(kept, round_to), current_channels)
            return current_channels - kept

    if not hasattr(tp.pruner.BasePruner, "_round_to"):  # pragma: no cover - API drift guard
        logger.warning("torch_pruning.BasePruner has no _round_to: using its own rounding")
        return tp.pruner.BasePruner
    return _RoundedPruner


def _channel_unsupported(model: nn.Module) -> list[str]:
    """Layers whose channels cannot be removed consistently: grouped convolutions that are neither
    dense nor depth-wise (removing channels would cut across their groups; e.g. MixConv2d, or a
    DWConv whose input and output widths differ), and Contract/Expand, which reshape channels
    into pixels and back."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.groups > 1 \
                and not m.groups == m.in_channels == m.out_channels:
            found.append(f"{name} ({type(m).__name__}, groups={m.groups}, {m.in_channels} -> {m.out_channels} "
                         "channels: neither dense nor depth-wise)")
        elif type(m).__name__ in ("Contract", "Expand"):
            found.append(f"{name} ({type(m).__name__}: reshapes channels into pixels)")
    return found


def _channel_fixed_width(model: nn.Module) -> list[nn.Module]:
    """Layers that keep their width: a transformer block's linear layers and attention (C3TR).
    Its heads split the channels in order, so removing some would regroup the rest into other
    heads; ignoring these layers keeps every channel group coupled to them intact."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]


def _channel_check(model: nn.Module, example: torch.Tensor) -> None:
    """A forward pass after pruning: shapes that no longer fit fail here, not later."""
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, IndexError) as e:
        raise RuntimeError(f"prune=channel left a model whose layers no longer fit together ({e}); "
                           "this model cannot be channel-pruned") from e


def channel(model: nn.Module, sparsity: float, spec: PruneSpec) -> nn.Module:
    """Remove output channels with Torch-Pruning (DepGraph, L2 magnitude, local ratio).

    ``sparsity`` is the fraction of output channels removed from each prunable layer group
    (Torch-Pruning keeps ``int(C * (1 - sparsity))``, then the kept count is rounded to the
    nearest multiple of ``spec.round_to``, at least one multiple: 16 channels at 0.3 keep
    8, 256 keep 176). The rounding override relies on ``BasePruner._round_to`` (present
    in torch-pruning 1.5/1.6; without it Torch-Pruning's floor rounding applies). Layers not selected by
    include/exclude and the Detect head's output convs keep their output channels (their
    input channels follow the layers feeding them). Works on fused and unfused models (the
    BatchNorm layers of an unfused model are pruned along with their convs).
    """
    if sparsity == 0:
        return model
    round_to = spec.round_to
    unsupported = _channel_unsupported(model)
    if unsupported:
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        raise ConfigError(f"prune=channel cannot remove channels around {unsupported[0]}{more}; the other "
                          "methods (l1_unstructured, global_l1, random, ln_structured) work on this model")
    selected = _selection(model, spec)
    chosen = {id(m) for m in selected.values()}
    heads = detect_head_convs(model)
    ignored = [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in chosen]
    ignored += [m for m in heads if id(m) in chosen]
    ignored += _channel_fixed_width(model)

    p = next(model.parameters())
    example = torch.zeros(CHANNEL_EXAMPLE_SHAPE, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    pruner = _channel_pruner_class(round_to)(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=sparsity,
        round_to=round_to,
        ignored_layers=ignored,
        global_pruning=False,
    )
    try:
        with torch.no_grad():
            pruner.step()
    except (RuntimeError, ValueError, IndexError) as e:
        raise RuntimeError(f"prune=channel failed inside Torch-Pruning ({type(e).__name__}: {e}); "
                           "this model cannot be channel-pruned") from e
    _channel_check(model, example)
    model.train(was_training)
    # Torch-Pruning's dependency graph leaves thousands of objects in reference cycles (nodes, dependencies,
    # bound methods): freed now rather than whenever the collector next runs (the evaluation pauses it)
    del pruner
    gc.collect()
    return model


PRUNERS: dict[str, PrunerFn] = {
    "l1_unstructured": l1_unstructured,
    "global_l1": global_l1,
    "lamp": lamp,
    "sensitivity": sensitivity,
    "random": random,
    "ln_structured": ln_structured,
    "channel": channel,
}
