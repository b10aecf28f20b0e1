"""Deployment side: ONNX export of the evaluated model, ONNX Runtime latency, the output-match check, the per-layer profile."""

from sweep.export.onnx import (ATOL, RTOL, MatchResult, OutputMismatchError, RuntimeLatency, check_outputs,
                               export_onnx, measure_ort_latency, onnx_runtime_latency, ort_session, providers_for,
                               sample_input)
from sweep.export.profile import layer_profile, layer_time_table

__all__ = ["ATOL", "RTOL", "MatchResult", "OutputMismatchError", "RuntimeLatency", "check_outputs", "export_onnx",
           "layer_profile", "layer_time_table", "measure_ort_latency", "onnx_runtime_latency", "ort_session",
           "providers_for", "sample_input"]
