"""Evaluate stage: the inference loop, val.py's NMS and box arithmetic, COCO evaluators, latency, device."""

from sweep.evaluate.coco import EVALUATORS, CocoEvaluator, CocoResult
from sweep.evaluate.device import resolve_device
from sweep.evaluate.latency import measure_latency
from sweep.evaluate.loop import LoopResult, gc_paused, run_inference

__all__ = ["EVALUATORS", "CocoEvaluator", "CocoResult", "LoopResult", "gc_paused", "measure_latency",
           "resolve_device", "run_inference"]
