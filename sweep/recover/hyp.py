"""Fine-tuning hyperparameters (YOLOv5's ``hyp.scratch-low.yaml``), re-exported for the recovery code.

The table and the override rule live with the other defaults, in ``sweep.config.hyp``.
"""

from sweep.config.hyp import HYP_SCRATCH_LOW, resolve_hyp

__all__ = ["HYP_SCRATCH_LOW", "resolve_hyp"]
