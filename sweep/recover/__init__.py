"""Recover stage: accuracy recovery after pruning (registry ``RECOVERERS``) and its calibration images."""

from sweep.recover.methods import RECOVERERS, Calibration, calibration_source

__all__ = ["RECOVERERS", "Calibration", "calibration_source"]
