"""Fine-tuning (sweep.recover.finetune): pruned zeros stay zero, the EMA weights are what comes back,
YOLOv5's warmup/accumulation schedule; the training loader (sweep.data.train).

A freshly built yolov5n (random weights) on tiny synthetic batches keeps these fast; the loader
tests use the real coco128 labels when the assets are there.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune

from sweep.model import build_model, fuse, load_model_yaml
from sweep.recover.finetune import ModelEMA, finetune, parameter_groups, zero_masks

S = 64  # synthetic image side


@pytest.fixture(scope="module")
def pristine() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_model_yaml("yolov5n")).float().eval()


def pruned_copy(model, sparsity=0.5):
    """Per-layer L1 on every Conv2d of the unfused model, made permanent (plain weights with exact zeros)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            tprune.l1_unstructured(m, "weight", amount=sparsity)
            tprune.remove(m, "weight")
    return model


def synthetic(n_batches: int = 2, batch: int = 2, seed: int = 0):
    """Fixed batches: random images, two boxes per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        images = torch.randint(0, 256, (batch, 3, S, S), generator=g, dtype=torch.uint8)
        rows = []
        for i in range(batch):
            for c, cx, cy, w, h in ((1, 0.3, 0.4, 0.2, 0.3), (7, 0.7, 0.6, 0.5, 0.4)):
                rows.append([i, c, cx, cy, w, h])
        out.append((images, torch.tensor(rows)))
    return lambda epoch: list(out)


def conv_zeros(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() == 0 for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim == 4}


def test_pruned_zeros_stay_exactly_zero_and_the_rest_trains(pristine):
    model = pruned_copy(pristine)
    before = conv_zeros(model)
    n_zero = sum(int(z.sum()) for z in before.values())
    assert n_zero > 0.45 * sum(z.numel() for z in before.values())
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    # a large lr so that any leak would show; use_ema=False: the raw weights after the last step
    m = finetune(model, synthetic(), batch=2, epochs=1, iters=4, imgsz=S, progress=False, use_ema=False,
                 hyp={"lr0": 0.5, "warmup_bias_lr": 0.5, "warmup_epochs": 0.0})
    assert m["recover_steps"] >= 2
    after = conv_zeros(model)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k}: the zero pattern changed"
    changed = [k for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim == 4
               and not torch.equal(v, w0[k])]
    assert len(changed) > 0.9 * len(before)  # the surviving weights did train


def test_zeros_stay_zero_in_the_ema_result_too(pristine):
    model = pruned_copy(pristine)
    before = conv_zeros(model)
    finetune(model, synthetic(), batch=2, epochs=2, imgsz=S, progress=False, hyp={"lr0": 0.5})
    assert {k: int(v.sum()) for k, v in conv_zeros(model).items()} == {k: int(v.sum()) for k, v in before.items()}
    assert all(torch.equal(conv_zeros(model)[k], before[k]) for k in before)


def test_the_ema_weights_are_what_comes_back_and_gets_evaluated(pristine):
    model = pruned_copy(pristine, 0.3)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots, steps = [], []

    def on_step(ni, metrics):  # runs right after each iteration: the raw weights of that moment
        steps.append(int(metrics["step"]))
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    finetune(model, synthetic(), batch=2, epochs=2, imgsz=S, progress=False, on_step=on_step, hyp={"lr0": 0.2})
    assert steps == [1, 2, 2, 3]  # accumulation ramps 1 -> 2 inside the warmup (batch 2 of nominal 64)
    # the EMA recurrence by hand, over the raw weights after each optimizer step
    ema = {k: v.clone() for k, v in w0.items()}
    updates = 0
    for k_step, snap in zip(steps, snapshots):
        if k_step == updates:
            continue
        updates = k_step
        d = 0.9999 * (1 - np.exp(-updates / 2000))
        for k, v in ema.items():
            if v.dtype.is_floating_point:
                ema[k] = v * d + (1 - d) * snap[k]
    final = model.state_dict()
    raw = snapshots[-1]
    for k, v in final.items():
        torch.testing.assert_close(v, ema[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    moved = [k for k, v in final.items() if v.dtype.is_floating_point and not torch.allclose(v, raw[k], atol=1e-6)]
    assert moved, "the result should be the EMA, not the raw last weights"
    # what gets evaluated: the fused returned model = the fused hand-made EMA model
    by_hand = copy.deepcopy(model)
    by_hand.load_state_dict(ema)
    x = torch.rand(1, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(fuse(copy.deepcopy(model))(x)[0], fuse(by_hand)(x)[0], rtol=1e-4, atol=1e-4)
    assert not model.training


def test_warmup_learning_rates_momentum_and_iteration_cap(pristine):
    model = copy.deepcopy(pristine)
    seen = []
    m = finetune(model, synthetic(), batch=2, epochs=3, iters=5, imgsz=S, progress=False,
                 on_step=lambda ni, x: seen.append((ni, x)))
    assert [ni for ni, _ in seen] == [0, 1, 2, 3, 4]
    assert (m["recover_iters"], m["recover_images"], m["recover_epochs"]) == (5, 10, 3)
    for ni, x in seen:
        epoch = ni // 2
        lf = (1 - epoch / 3) * 0.99 + 0.01
        f = ni / 100  # warmup: 100 iterations at least
        assert x["lr0"] == pytest.approx(0.1 + (0.01 * lf - 0.1) * f)  # bias lr from warmup_bias_lr
        assert x["lr1"] == pytest.approx(0.01 * lf * f) and x["lr2"] == x["lr1"]
        assert x["momentum"] == pytest.approx(0.8 + (0.937 - 0.8) * f)
        assert x["loss"] == pytest.approx(x["box"] + x["obj"] + x["cls"])
    assert m["finetune_loss"] > 0


def test_parameter_groups_and_ema_decay(pristine):
    biases, decayed, norm_w = parameter_groups(pristine)
    n_bn = sum(1 for mod in pristine.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert len(norm_w) == n_bn and len(biases) == n_bn + 3  # BN biases + the 3 Detect conv biases
    assert all(p.ndim == 4 for p in decayed)
    assert len(biases) + len(decayed) + len(norm_w) == len(list(pristine.parameters()))
    ema = ModelEMA(pristine)
    assert ema.decay_at(1) == pytest.approx(0.9999 * (1 - np.exp(-1 / 2000)))
    assert not any(p.requires_grad for p in ema.ema.parameters())


def test_zero_masks_only_where_zeros_are(pristine):
    assert zero_masks(pristine) == {}
    masks = zero_masks(pruned_copy(pristine))
    assert "model.0.conv.weight" in masks and masks["model.0.conv.weight"].dtype == torch.bool


def test_channel_pruned_model_trains_at_its_reduced_shapes(pristine):
    from sweep.prune.methods import PRUNERS

    spec = SimpleNamespace(method="channel", fused=False, include=(), exclude=(), seed=0, round_to=8, save=False)
    model = PRUNERS["channel"](copy.deepcopy(pristine), 0.3, spec)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(p.numel() for p in pristine.parameters())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    finetune(model, synthetic(), batch=2, epochs=1, imgsz=S, progress=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_bad_arguments(pristine):
    with pytest.raises(ValueError, match="epochs"):
        finetune(copy.deepcopy(pristine), synthetic(), batch=2, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr00"):
        finetune(copy.deepcopy(pristine), synthetic(), batch=2, hyp={"lr00": 1}, progress=False)
