"""Evaluate stage: the inference loop, val.py's NMS and box arithmetic, COCO evaluators, latency."""

from sweep.evaluate.coco import EVALUATORS, CocoEvaluator
from sweep.evaluate.loop import measure_latency, resolve_device, run_inference

__all__ = ["EVALUATORS", "CocoEvaluator", "measure_latency", "resolve_device", "run_inference"]
