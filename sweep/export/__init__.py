"""Deployment side: ONNX export of the evaluated model, ONNX Runtime latency, the output-match check."""

from sweep.export.onnx import (ATOL, RTOL, MatchResult, OutputMismatchError, RuntimeLatency, check_outputs,
                               export_onnx, measure_ort_latency, onnx_runtime_latency, ort_session, providers_for,
                               sample_input)

__all__ = ["ATOL", "RTOL", "MatchResult", "OutputMismatchError", "RuntimeLatency", "check_outputs", "export_onnx",
           "measure_ort_latency", "onnx_runtime_latency", "ort_session", "providers_for", "sample_input"]
