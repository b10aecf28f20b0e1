"""Fine-tuning hyperparameter defaults: YOLOv5's ``hyp.scratch-low.yaml`` values (v7.0) as a plain dict.

Pure Python: the config schema (``recover.hyp``), the loss, the training loop and the data loader
all read the same table; ``resolve_hyp`` applies overrides to it. Names are YOLOv5's, so a YOLOv5 hyp yaml can be passed as overrides unchanged.

Groups: optimizer (``lr0`` .. ``warmup_bias_lr``), loss (``box`` .. ``fl_gamma``,
``label_smoothing``; ``iou_t`` is unused by the v5+ loss and kept only because the yaml has it),
augmentation (``hsv_h`` .. ``copy_paste``). ``label_smoothing`` is a train.py option
(``--label-smoothing``, default 0.0), not a yaml key; it is here so everything the loss reads is
in one mapping.
"""

from __future__ import annotations

from typing import Any, Mapping

#: YOLOv5 hyp.scratch-low.yaml (plus train.py's label_smoothing default).
HYP_SCRATCH_LOW: dict[str, float] = {
    # optimizer / schedule
    "lr0": 0.01,             # initial learning rate (SGD)
    "lrf": 0.01,             # final learning rate = lr0 * lrf (linear decay)
    "momentum": 0.937,       # SGD momentum (Nesterov)
    "weight_decay": 0.0005,  # at the nominal batch of 64
    "warmup_epochs": 3.0,    # at least 100 iterations
    "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
    # loss
    "box": 0.05,
    "cls": 0.5,
    "cls_pw": 1.0,
    "obj": 1.0,
    "obj_pw": 1.0,
    "iou_t": 0.20,
    "anchor_t": 4.0,
    "fl_gamma": 0.0,
    "label_smoothing": 0.0,
    # augmentation
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
    "degrees": 0.0,
    "translate": 0.1,
    "scale": 0.5,
    "shear": 0.0,
    "perspective": 0.0,
    "flipud": 0.0,
    "fliplr": 0.5,
    "mosaic": 1.0,
    "mixup": 0.0,
    "copy_paste": 0.0,
}


def resolve_hyp(overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
    """``HYP_SCRATCH_LOW`` updated with ``overrides``; an unknown key is a ValueError naming it."""
    hyp = dict(HYP_SCRATCH_LOW)
    for key, value in (overrides or {}).items():
        if key not in hyp:
            raise ValueError(f"unknown hyperparameter {key!r}: allowed are {', '.join(sorted(hyp))}")
        try:
            hyp[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameter {key}={value!r} is not a number") from None
    return hyp
