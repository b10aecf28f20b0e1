"""Fine-tuning recovery: YOLOv5's training recipe (train.py, v7.0) on a pruned, UNFUSED model.

:func:`finetune` is the whole loop as a plain function; the caller prunes, optionally
recalibrates BatchNorm (:func:`sweep.recover.methods.recalibrate_batchnorm`), calls it, then fuses
and evaluates the model, which on return holds the EMA weights (what YOLOv5 saves and evaluates).

The recipe (all YOLOv5's published values and formulas; the code is ours):

* Loss: :class:`sweep.loss.YoloLoss` with the gains scaled as train.py scales them
  (:func:`sweep.loss.scaled_loss_hyp`: box x 3/nl, cls x nc/80 x 3/nl, obj x (imgsz/640)^2 x 3/nl).
* Optimizer: ``torch.optim.SGD`` with Nesterov momentum ``momentum`` and three parameter groups:
  0 = every ``bias`` (no weight decay), 1 = the other weights (weight decay), 2 = the weights of
  normalisation layers (no weight decay). Weight decay is ``weight_decay * batch * accumulate /
  nominal_batch``; gradients are accumulated over ``accumulate = max(round(nominal_batch /
  batch), 1)`` batches per optimizer step (the loss is already multiplied by the batch size).
* Schedule: per epoch ``lr = lr0 * lf(epoch)`` with the linear ``lf(e) = (1 - e / epochs) (1 -
  lrf) + lrf``. Warmup over the first ``nw = max(round(warmup_epochs * nb), 100)`` iterations (nb
  batches per epoch): iteration ``ni`` interpolates linearly from 0 to ``nw`` the bias group's lr
  from ``warmup_bias_lr`` (the others from 0) to ``lr0 * lf(epoch)``, the momentum from
  ``warmup_momentum`` to ``momentum``, and ``accumulate`` from 1 to ``nominal_batch / batch``
  (rounded). A step happens when ``ni - last_step >= accumulate``.
* Each step: unscale (AMP), gradient-norm clipping to 10 (``clip_grad_norm_``), ``optimizer.step``,
  then the EMA update. EMA: ``ema = d ema + (1 - d) model`` over every floating-point entry of the
  state_dict (weights and BatchNorm buffers), ``d = 0.9999 (1 - exp(-updates / 2000))``.
* AMP (``torch.autocast`` + ``GradScaler``) on CUDA, FP32 on the CPU. BatchNorm trains in train
  mode (its running statistics keep updating with momentum 0.03, as in YOLOv5).

Pruned stays pruned: ``masks`` (default: every exact zero of every Conv2d weight at the start) are
enforced two ways. (1) Gradient masking: before clipping, the gradients of the masked entries are
set to zero, so the gradient norm, the momentum buffers and the update are exactly what torch's
pruning parametrization (``weight = weight_orig * mask``, the reference's setup) gives: a zero
gradient for pruned weights, hence a zero update (SGD's weight decay term is ``wd * 0 = 0`` and
the momentum buffer stays 0). (2) The masks are re-applied to the weights after every step and to
the EMA after every update, so exact zeros hold whatever the optimizer does (e.g. a NaN/inf step
that a GradScaler skipped is not an issue either way). The EMA of exact zeros is exactly zero
anyway (``d * 0 + (1 - d) * 0``). Channel-pruned models simply train at their reduced shapes.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from sweep.loss import YoloLoss, detect_head, scaled_loss_hyp
from sweep.config.hyp import resolve_hyp

log = logging.getLogger(__name__)

__all__ = ["ModelEMA", "finetune", "parameter_groups", "zero_masks", "apply_masks", "lr_factor",
           "warmup_iterations", "NOMINAL_BATCH", "CLIP_NORM"]

NOMINAL_BATCH = 64
CLIP_NORM = 10.0
WARMUP_MIN_ITERS = 100
EMA_DECAY, EMA_TAU = 0.9999, 2000

BatchesFactory = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
StepCallback = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------- pieces


class ModelEMA:
    """Exponential moving average of a model's state_dict (YOLOv5's ModelEMA definition).

    ``ema``: a deep copy in eval mode without gradients. ``update(model)``: ``updates += 1``, ``d =
    decay (1 - exp(-updates / tau))``, then every floating-point state_dict entry ``v = d v + (1 -
    d) model_v`` (weights and BatchNorm buffers alike; integer buffers such as BatchNorm's
    ``num_batches_tracked`` are left as copied).
    """

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY, tau: float = EMA_TAU, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = float(decay), float(tau), int(updates)

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``; returns the decay used."""
        self.updates += 1
        d = self.decay_at(self.updates)
        current = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v *= d
                v += (1 - d) * current[k].detach()
        return d


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool keep-mask}`` for every Conv2d weight that has exact zeros (False = zero)."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "weight", None), nn.Parameter):
            keep = m.weight.detach() != 0
            if not bool(keep.all()):
                masks[f"{name}.weight" if name else "weight"] = keep
    return masks


@torch.no_grad()
def apply_masks(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], grads: bool = False) -> None:
    """Zero the masked entries of ``params[name]`` (or of its ``.grad`` when ``grads``), in place."""
    for name, keep in masks.items():
        t = params[name]
        if grads:
            if t.grad is not None:
                t.grad.mul_(keep)
        else:
            t.mul_(keep)


def _norm_classes() -> tuple[type, ...]:
    """Every normalisation layer class of torch.nn (YOLOv5: the classes with 'Norm' in their name)."""
    return tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """YOLOv5's three groups: (biases, weights with decay, normalisation-layer weights)."""
    norms = _norm_classes()
    biases, decay, no_decay = [], [], []
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                biases.append(p)
            elif pname == "weight" and isinstance(m, norms):
                no_decay.append(p)
            else:
                decay.append(p)
    return biases, decay, no_decay


def lr_factor(epoch: int, epochs: int, lrf: float) -> float:
    """YOLOv5's linear schedule: ``(1 - epoch / epochs) (1 - lrf) + lrf``."""
    return (1 - epoch / epochs) * (1.0 - lrf) + lrf


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int) -> int:
    return max(round(warmup_epochs * batches_per_epoch), WARMUP_MIN_ITERS)


def _progress_bar(total: int, desc: str, progress: Any):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=True, file=progress if hasattr(progress, "write") else sys.stderr,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- the loop


def finetune(model: nn.Module, batches: BatchesFactory, *, batch: int, epochs: int = 1, iters: int | None = None,
             hyp: Mapping[str, Any] | None = None, imgsz: int = 640, nominal_batch: int = NOMINAL_BATCH,
             batches_per_epoch: int | None = None, device: Any = None, amp: bool | None = None,
             masks: Mapping[str, torch.Tensor] | None = None, use_ema: bool = True,
             clip_norm: float = CLIP_NORM, progress: Any = True, on_step: StepCallback | None = None
             ) -> dict[str, float]:
    """Fine-tune ``model`` (unfused, pruned or not) in place with YOLOv5's recipe (module doc).

    ``batches(epoch)`` returns that epoch's iterable of ``(images, targets)``: images ``[B, 3, S,
    S]`` uint8 (or float 0-255), targets ``[N, 6]`` ``(image index, class, cx, cy, w, h)``
    normalised (e.g. :meth:`sweep.data.train.TrainLoader.epoch`). ``batch``: the loader's batch
    size (for the accumulation and the weight decay scaling). ``batches_per_epoch``: nb for the
    warmup length; default ``len(batches(0))``.

    ``epochs``: training epochs (the LR schedule's length); ``iters``: optional cap on the total
    number of batches (training stops there, the schedule still assumes ``epochs``). ``hyp``:
    overrides of :data:`sweep.config.hyp.HYP_SCRATCH_LOW`. ``imgsz``: the training image size (obj
    gain scaling). ``device``: default the model's; ``amp``: default True on CUDA only.
    ``masks``: ``{param name: bool keep}``; default :func:`zero_masks` (every zero of every Conv2d
    weight stays zero). ``use_ema``: load the EMA weights into ``model`` at the end (YOLOv5 saves
    and evaluates those); False keeps the last raw weights. ``progress``: a tqdm bar per epoch
    (True -> stderr, or a file). ``on_step(iteration, metrics)``: called after every batch with
    ``loss, box, obj, cls`` (that batch's components; ``loss`` their sum), ``lr0, lr1, lr2``
    (group learning rates: biases, weights, norm weights), ``momentum``, ``epoch``, ``step`` (optimizer
    steps so far), ``images`` (seen so far).

    Returns metrics: ``recover_seconds``, ``recover_images`` (images seen), ``recover_iters``,
    ``recover_steps`` (optimizer steps = EMA updates), ``recover_epochs`` (completed or started),
    ``finetune_box/obj/cls/loss`` (mean components over the last epoch run). The model ends in eval
    mode on its original device, with its masked entries exactly zero.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    if iters is not None and iters < 1:
        raise ValueError(f"iters={iters} must be >= 1 (or None for no cap)")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    params = dict(model.named_parameters())
    first = next(iter(params.values()), None)
    if first is None:
        raise ValueError("the model has no parameters to train")
    home = first.device
    dev = torch.device(device) if device is not None else home
    amp = (dev.type == "cuda") if amp is None else bool(amp and dev.type == "cuda")
    probe = None
    if batches_per_epoch is None:
        probe = batches(0)  # reused as epoch 0's data
        if not hasattr(probe, "__len__"):
            raise ValueError("batches(epoch) has no len(): pass batches_per_epoch")
        batches_per_epoch = len(probe)  # type: ignore[arg-type]
    nb = int(batches_per_epoch)
    if nb < 1:
        raise ValueError("the training data gives no batch")

    masks = zero_masks(model) if masks is None else dict(masks)
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks for unknown parameters: {', '.join(unknown[:5])}")

    head = detect_head(model)
    h = resolve_hyp(hyp)
    loss_hyp = scaled_loss_hyp(h, nl=int(head.nl), nc=int(head.nc), imgsz=int(imgsz))
    accumulate = max(round(nominal_batch / batch), 1)
    weight_decay = h["weight_decay"] * batch * accumulate / nominal_batch

    model.to(dev)
    masks = {k: v.to(dev) for k, v in masks.items()}
    params = dict(model.named_parameters())
    apply_masks(params, masks)  # no-op for masks derived from the zeros; enforces explicit ones
    biases, decayed, norm_weights = parameter_groups(model)
    optimizer = torch.optim.SGD(biases, lr=h["lr0"], momentum=h["momentum"], nesterov=True)
    optimizer.add_param_group({"params": decayed, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    compute_loss = YoloLoss(model, loss_hyp)
    ema = ModelEMA(model)
    ema_params = dict(ema.ema.named_parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    nw = warmup_iterations(h["warmup_epochs"], nb)
    warm = [0, nw]
    last_step, steps, seen, ni = -1, 0, 0, 0
    epoch_means = torch.zeros(3)
    epochs_run = 0
    t0 = time.perf_counter()
    try:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        done = False
        for epoch in range(epochs):
            lf = lr_factor(epoch, epochs, h["lrf"])
            for g in optimizer.param_groups:
                g["lr"] = h["lr0"] * lf  # the epoch's scheduled lr (warmup overrides it below)
            epochs_run += 1
            sums, count = torch.zeros(3), 0
            total = nb if iters is None else min(nb, iters - nb * epoch)
            bar = _progress_bar(total, f"finetune {epoch + 1}/{epochs}", progress)
            data = probe if (epoch == 0 and probe is not None) else batches(epoch)
            for i, (images, targets) in enumerate(data):
                ni = i + nb * epoch
                if ni <= nw:
                    accumulate = max(1, float(np.interp(ni, warm, [1, nominal_batch / batch]).round()))
                    for j, g in enumerate(optimizer.param_groups):
                        g["lr"] = float(np.interp(ni, warm, [h["warmup_bias_lr"] if j == 0 else 0.0, h["lr0"] * lf]))
                        g["momentum"] = float(np.interp(ni, warm, [h["warmup_momentum"], h["momentum"]]))
                x = images.to(dev, non_blocking=True).float() / 255.0
                with torch.autocast(device_type=dev.type, enabled=amp):
                    preds = model(x)
                    loss, components = compute_loss(preds, targets.to(dev))
                scaler.scale(loss).backward()
                if ni - last_step >= accumulate:
                    scaler.unscale_(optimizer)
                    apply_masks(params, masks, grads=True)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    apply_masks(params, masks)
                    ema.update(model)
                    apply_masks(ema_params, masks)
                    last_step = ni
                    steps += 1
                seen += int(x.shape[0])
                comp = components.float().cpu()
                sums += comp
                count += 1
                lrs = [float(g["lr"]) for g in optimizer.param_groups]
                if bar is not None:
                    bar.set_postfix(box=f"{comp[0]:.4f}", obj=f"{comp[1]:.4f}", cls=f"{comp[2]:.4f}",
                                    lr=f"{lrs[1]:.2e}", bias_lr=f"{lrs[0]:.3f}", refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(ni, {"loss": float(comp.sum()), "box": float(comp[0]), "obj": float(comp[1]),
                                 "cls": float(comp[2]), "lr0": lrs[0], "lr1": lrs[1], "lr2": lrs[2],
                                 "momentum": float(optimizer.param_groups[0]["momentum"]), "epoch": float(epoch),
                                 "step": float(steps), "images": float(seen)})
                if iters is not None and ni + 1 >= iters:
                    done = True
                    break
            if bar is not None:
                bar.close()
            if count:
                epoch_means = sums / count
            if done:
                break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if use_ema:
            model.load_state_dict(ema.ema.state_dict())
        apply_masks(dict(model.named_parameters()), masks)
        model.to(home)
        model.eval()
    seconds = time.perf_counter() - t0
    log.info("fine-tuning: %d images, %d iterations, %d optimizer steps in %.1fs", seen, ni + 1 if seen else 0,
             steps, seconds)
    return {"recover_seconds": float(seconds), "recover_images": float(seen),
            "recover_iters": float(ni + 1 if seen else 0), "recover_steps": float(steps),
            "recover_epochs": float(epochs_run), "finetune_box": float(epoch_means[0]),
            "finetune_obj": float(epoch_means[1]), "finetune_cls": float(epoch_means[2]),
            "finetune_loss": float(epoch_means.sum())}
