"""Fine-tuning (sweep.recover.finetune): pruned zeros stay zero, the EMA weights are what comes back,
YOLOv5's warmup/accumulation schedule; the training loader (sweep.data.train).

A freshly built yolov5n (random weights) on tiny synthetic batches keeps these fast; the loader
tests use the real coco128 labels when the assets are there.
"""

from __future__ import annotations

import copy
import math
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


# --------------------------------------------------------------------------- the training loader

from sweep.data.train import TrainLoader, box_candidates, xyxy_to_xywhn  # noqa: E402

RED = (0, 0, 255)  # BGR
BG = (40, 160, 40)


def red_square_dataset(root, sizes=((200, 100), (120, 160), (160, 160), (90, 150))):
    """PNG images (w x h) on a green background, each with one red rectangle and its YOLO label."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    boxes = []
    for k, (w, h) in enumerate(sizes):
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = BG
        x1, y1, x2, y2 = w // 4, h // 3, w // 4 + w // 2, h // 3 + h // 2
        img[y1:y2, x1:x2] = RED
        import cv2

        cv2.imwrite(str(root / "images" / f"{k:03d}.png"), img)
        cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
        (root / "labels" / f"{k:03d}.txt").write_text(f"{k} {cx} {cy} {bw} {bh}\n")
        boxes.append((k, cx, cy, bw, bh))
    return root / "images", boxes


def is_red(chw: torch.Tensor) -> torch.Tensor:
    r, g, b = chw.int()  # RGB
    return (r > 200) & (g < 60) & (b < 60)


def test_augmented_boxes_follow_the_pixels(tmp_path):
    src, _ = red_square_dataset(tmp_path)
    loader = TrainLoader(src, imgsz=64, batch=4, hyp={"hsv_h": 0, "hsv_s": 0, "hsv_v": 0}, seed=3, workers=0)
    n_boxes = 0
    for epoch in range(6):
        for images, targets in loader(epoch):
            assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
            assert targets.shape[1] == 6 and ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
            for i in range(4):
                red = is_red(images[i])
                covered = torch.zeros_like(red)
                for _, c, cx, cy, w, h in targets[targets[:, 0] == i].tolist():
                    x1, y1, x2, y2 = ((cx - w / 2) * 64, (cy - h / 2) * 64, (cx + w / 2) * 64, (cy + h / 2) * 64)
                    inner = red[math.ceil(y1) + 1:math.floor(y2) - 1, math.ceil(x1) + 1:math.floor(x2) - 1]
                    assert inner.numel() == 0 or inner.float().mean() > 0.97, "a box that is not on its object"
                    covered[max(0, int(y1) - 1):int(y2) + 2, max(0, int(x1) - 1):int(x2) + 2] = True
                    n_boxes += 1
                if red.sum() > 20:  # red left outside every box: only slivers the candidate filter dropped
                    assert (red & ~covered).sum() <= 0.2 * red.sum()
    assert n_boxes > 20


def test_loader_is_deterministic_per_seed_and_epoch_whatever_the_workers(tmp_path):
    src, _ = red_square_dataset(tmp_path)
    a = list(TrainLoader(src, imgsz=64, batch=3, seed=1, workers=0)(2))
    b = list(TrainLoader(src, imgsz=64, batch=3, seed=1, workers=2)(2))
    assert len(a) == 2 and [x[0].shape[0] for x in a] == [3, 1]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    c = list(TrainLoader(src, imgsz=64, batch=3, seed=1, workers=0)(3))
    assert not torch.equal(a[0][0], c[0][0])


def test_plain_mode_is_the_val_letterbox_with_its_boxes(tmp_path):
    from sweep.data.dataset import preprocess_into

    src, boxes = red_square_dataset(tmp_path)
    loader = TrainLoader(src, imgsz=64, batch=4, augment=False, shuffle=False, workers=0)
    (images, targets), = list(loader(0))
    files = sorted(src.glob("*.png"))
    for i, f in enumerate(files):
        want, _, _ = preprocess_into(str(f), 64, (64, 64))
        assert torch.equal(images[i], torch.from_numpy(want))
    # image 0 is 200 x 100: resized to 64 x 32 and padded by 16 above and below
    k, cx, cy, bw, bh = boxes[0]
    row = targets[targets[:, 0] == 0][0].tolist()
    assert row[1] == k
    assert row[2:] == pytest.approx([cx, (cy * 32 + 16) / 64, bw, bh * 32 / 64], abs=1e-5)


def test_real_coco128_batches(assets):
    src = assets / "datasets" / "coco128" / "images" / "train2017"
    if not src.is_dir():
        pytest.skip("coco128 is not among the assets")
    loader = TrainLoader(src, imgsz=320, batch=8, workers=2)
    assert len(loader.files) == 128 and len(loader) == 16 and loader.instances > 900
    images, targets = next(iter(loader(0)))
    assert images.shape == (8, 3, 320, 320)
    assert len(targets) > 8 and set(targets[:, 0].long().tolist()) <= set(range(8))
    assert (targets[:, 1] == targets[:, 1].round()).all() and targets[:, 1].max() < 80
    assert (targets[:, 4:] > 0).all()


def test_box_helpers():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    after = np.array([[0, 0, 10, 10], [0, 0, 10, 0.5], [0, 0, 3, 3]], float)
    assert box_candidates(before, after).tolist() == [True, False, False]  # too thin; 9% of the area
    np.testing.assert_allclose(xyxy_to_xywhn(np.array([[-5.0, 10, 20, 30]]), 40, 40),
                               [[10 / 40, 0.5, 0.5, 0.5]])  # clipped to x 0..20


def test_copy_paste_is_refused(tmp_path):
    src, _ = red_square_dataset(tmp_path)
    with pytest.raises(ValueError, match="copy_paste"):
        TrainLoader(src, imgsz=64, hyp={"copy_paste": 0.5})
