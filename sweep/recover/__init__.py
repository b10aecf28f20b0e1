"""Recover stage: accuracy recovery after pruning (registry ``RECOVERERS``) and its calibration images."""

from sweep.recover.calibration import Calibration, calibration_images
from sweep.recover.methods import RECOVERERS, recalibrate_batchnorm

__all__ = ["RECOVERERS", "Calibration", "calibration_images", "recalibrate_batchnorm"]
