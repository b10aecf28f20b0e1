"""One sweep job as a pipeline: resolve -> load -> prune and recover -> accounting -> evaluate -> latency -> write.

``run_job(cfg, ctx, memo)`` is the whole job as a plain function (tests call it directly): it
resolves the composed config into a :class:`JobSpec` (every input error raised there, before any
MLflow run exists), then runs the stages, each a small function taking its own part of the spec.
``task(cfg, memo)`` is the Hydra task wrapper: it turns failures into one clear message, records
the outcome for the end-of-sweep summary, and never lets a failed job stop a sweep.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from sweep import contract
from sweep.assets import AssetError
from sweep.config.resolve import resolve_job, resolve_tracking
from sweep.config.schema import ConfigError
from sweep.config.spec import EvalSpec, JobSpec, PruneSpec, RecoverSpec, TrackSpec
from sweep.contract import Outcome
from sweep.data import DataError
from sweep.evaluate import CocoEvaluator, CocoResult, LoopResult, gc_paused, measure_latency, run_inference
from sweep.evaluate.device import release_cached_memory
from sweep.evaluate.latency import measure_latency_pair
from sweep.evaluate.timing import Stopwatch
from sweep.evaluate.worker import PendingEvaluation, coco_worker, evaluate_here
from sweep.memo import EvalData, ProcessMemo
from sweep.export import layer_time_table, onnx_runtime_latency
from sweep.model import ArtifactFiles, CheckpointError, LoadedCheckpoint, artifact_sizes, fuse, load_artifact, \
    save_artifact
from sweep.prune import PRUNERS, accounting, select_convs
from sweep.prune.accounting import sizes_mb
from sweep.prune.sensitivity import allocate, allocation_table, write_allocation
from sweep.recover import RECOVERERS, Calibration
from sweep.track import Tracker, TrackingError, environment_tags
from sweep.track.spool import EXIT_PENDING, RunRecord, RunSink, pending_message, upload_pending

log = logging.getLogger(__name__)

# Errors whose message already says what is wrong with the user's input (exit status 2, no traceback).
USER_ERRORS = (ConfigError, AssetError, CheckpointError, DataError, TrackingError)


@dataclass
class JobContext:
    """Where a job writes and how it belongs to a sweep (filled from HydraConfig by ``task``)."""

    output_dir: Path
    sweep_id: str | None = None
    overrides: list[str] = field(default_factory=list)
    job_num: int = 0


# ------------------------------------------------------------------------------- stages


def load_model(ckpt: LoadedCheckpoint) -> nn.Module:
    """A fresh FP32 eval-mode copy of the pristine pretrained model (the memo's copy is never changed)."""
    return copy.deepcopy(ckpt.model).float().eval()


def prune_and_recover(model: nn.Module, sparsity: float, prune: PruneSpec, recover: RecoverSpec,
                      calibration: Calibration | None, sw: Stopwatch | None = None
                      ) -> tuple[nn.Module, dict[str, float]]:
    """The one implementation of the order: returns the fused, pruned (and recovered) model and the
    recovery's metrics.

    ``prune.fused`` (the tutorial): fuse -> prune. Otherwise prune -> recover -> fuse: recovery such as
    BatchNorm recalibration needs the unfused BatchNorm layers, and the zeros survive fusion (folding
    BN only scales each output filter).
    """
    sw = sw or Stopwatch()
    with sw.stage("prune"):
        if prune.fused:
            model = fuse(model)
        if sparsity > 0:
            model = PRUNERS[prune.method](model, sparsity, prune)
    metrics: dict[str, float] = {}
    with sw.stage("recover"):
        if recover.method != "none":
            metrics = RECOVERERS[recover.method](model, recover, calibration)
    if not prune.fused:
        model = fuse(model)
    return model, metrics


def allocate_layers(spec: JobSpec, ckpt: LoadedCheckpoint, memo: ProcessMemo, eval_files: list[str],
                    device: torch.device) -> tuple[PruneSpec, pd.DataFrame, dict[str, float]]:
    """``prune=sensitivity``: the per-layer zero counts from the model's sensitivity curves (measured once per
    model and calibration set, see ``ProcessMemo.sensitivity_curves``). Returns the prune spec with its
    ``allocation``, the allocation table (the job's ``allocation.csv``) and the curve figures for metrics.json."""
    calibration = memo.calibration(spec.prune.calibration, spec.eval, eval_files, device, ckpt.names)
    curves, where, seconds = memo.sensitivity_curves(spec.prune, ckpt, calibration, device)
    zeros = allocate(curves, round(spec.sparsity * sum(c.numel for c in curves)))  # torch's global count
    table = allocation_table(curves, zeros)
    metrics = {"curves_seconds": seconds, "curves_measured": float(where == "measured"),
               "allocation_distortion": float(table["distortion"].sum())}
    return dataclasses.replace(spec.prune, allocation=tuple(zeros.items())), table, metrics


def account(model: nn.Module, spec: JobSpec, dense: dict[str, Any], dense_model: nn.Module
            ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Sparsity and cost figures of the FP32 model (before any FP16 cast), against the dense model's.

    The GFLOPs are the dense model's whenever the shapes are (every method but ``channel``). The stored and
    compressed sizes are left out: :func:`size_figures` computes them off the critical path."""
    selected = list(select_convs(model, spec.prune.include, spec.prune.exclude))
    return accounting(model, selected, spec.eval.imgsz, spec.sparsity, reference=dense, reference_model=dense_model,
                      sizes=False)


def size_figures(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """``size_mb`` and ``size_mb_compressed`` of a state_dict (``torch.save`` + zstd: seconds for yolov5x, so a
    job runs it in a background thread on the state_dict taken at accounting time)."""
    return dict(zip(("size_mb", "size_mb_compressed"), sizes_mb(state)))


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` in a thread of its own (it ends with the call)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="background")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def evaluate(model: nn.Module, data: EvalData, batches: Any, ev: EvalSpec, device: torch.device,
             evaluator: CocoEvaluator, label: str) -> LoopResult:
    """The inference loop over the dataset's batches (the evaluator collects the detections)."""
    bar = tqdm(total=len(data), desc=label, unit="img", leave=False, file=sys.stderr) if ev.progress else None
    try:
        return run_inference(model, batches, evaluator, device=device, half=ev.half, conf=ev.conf, iou=ev.iou,
                             max_det=ev.max_det, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def latency(model: nn.Module, ev: EvalSpec, device: torch.device, dense: nn.Module | None = None) -> dict[str, float]:
    """Forward milliseconds on a synthetic input, median and quartiles: batch 1, and per image at ``eval.batch``.

    With ``dense`` (the job's dense model, fused and cast alike) batch 1 is timed alternately with it in this
    process, giving the speed-up over dense under the same load; without it (a dense job) the speed-up is 1.
    Warns when the batch-1 spread says the machine was busy (its medians are then not to be trusted).
    """
    b = ev.batch
    per_batch_iters = max(3, ev.latency_iters // 10) if device.type == "cpu" else ev.latency_iters
    kw = dict(device=device, half=ev.half, imgsz=ev.imgsz)
    if dense is not None:
        b1, d1 = measure_latency_pair(model, dense, batch=1, iters=ev.latency_iters, **kw)
    else:
        b1 = d1 = measure_latency(model, batch=1, iters=ev.latency_iters, **kw)
    bb = measure_latency(model, batch=b, iters=per_batch_iters, **kw).per_image(b)
    out: dict[str, float] = {}
    for name, st in ((contract.LATENCY_B1, b1), (contract.latency_batch_metric(b), bb),
                     (contract.LATENCY_DENSE_B1, d1)):
        q1, q3 = contract.latency_quartiles(name)
        out |= {name: st.median_ms, q1: st.q1_ms, q3: st.q3_ms}
    out[contract.LATENCY_SPEEDUP_B1] = d1.median_ms / b1.median_ms if b1.median_ms > 0 else float("nan")
    out[contract.LATENCY_SPREAD_B1] = max(b1.spread, d1.spread)
    if out[contract.LATENCY_SPREAD_B1] > contract.LATENCY_BUSY_SPREAD:
        log.warning("latency: the machine was busy (batch-1 interquartile range %.0f%% of the median over %d "
                    "runs, quiet is < %.0f%%): the ms figures are not reliable, the speed-up over dense (%.2fx, "
                    "timed alternately) less affected", 100 * out[contract.LATENCY_SPREAD_B1], b1.iters,
                    100 * contract.LATENCY_BUSY_SPREAD, out[contract.LATENCY_SPEEDUP_B1])
    return out


def save_model(model: nn.Module, folder: Path, stem: str = "pruned") -> tuple[ArtifactFiles, dict[str, float]]:
    """The evaluated model as the pickle-free artifact (``<stem>.safetensors`` + ``<stem>.json``), and its
    stored and zstd-compressed sizes."""
    files = save_artifact(model, folder, stem)
    stored, compressed = artifact_sizes(files)
    return files, {contract.ARTIFACT_MB: stored, contract.ARTIFACT_MB_COMPRESSED: compressed}


def runtime_latency(artifact: ArtifactFiles, ev: EvalSpec, device: torch.device, onnx_path: Path,
                    dense: nn.Module | None = None) -> dict[str, Any]:
    """ONNX Runtime latency of the model rebuilt from its artifact (exported to ``onnx_path``; its outputs
    checked against PyTorch's first, ``sweep.export.OutputMismatchError`` otherwise): batch 1, and per
    image at ``eval.batch``; with ``dense`` (FP32), batch 1 timed alternately with it and the speed-up."""
    model = load_artifact(artifact.description).model
    r = onnx_runtime_latency(model, onnx_path, imgsz=ev.imgsz, batch=ev.batch, iters=ev.latency_iters,
                             device=device, reference=dense)
    out = {contract.ORT_LATENCY_B1: r.b1_ms, contract.ort_latency_batch_metric(r.batch): r.batch_ms_per_image,
           contract.ORT_MAX_ABS_DIFF: r.max_abs_diff, contract.ONNX_MB: r.onnx_mb, contract.ORT_PROVIDER: r.provider}
    if r.speedup_b1 is not None:
        out |= {contract.ORT_LATENCY_DENSE_B1: r.dense_b1_ms, contract.ORT_SPEEDUP_B1: r.speedup_b1}
    return out


def save_and_deploy(model: nn.Module, dense: nn.Module | None, spec: JobSpec, device: torch.device, out: Path,
                    sw: Stopwatch) -> tuple[dict[str, Any], list[Path]]:
    """``prune.save``: the pickle-free artifact in the job's folder; ``eval.runtimes`` with onnxruntime: the ONNX
    export of that artifact timed in ONNX Runtime (from a temporary artifact when the job does not save one),
    alternately with ``dense`` (the FP32 dense model; None for a dense job) for the speed-up."""
    metrics: dict[str, Any] = {}
    files: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="sweep-export-") as tmp:
        where = out if spec.prune.save else Path(tmp)
        with sw.stage("save"):
            artifact, sizes = save_model(model, where)
        if spec.prune.save:
            metrics |= sizes
            files += artifact.paths
        if "onnxruntime" in spec.eval.runtimes:
            with sw.stage("onnxruntime"):
                metrics |= runtime_latency(artifact, spec.eval, device, where / "pruned.onnx", dense)
            if spec.prune.save:
                files.append(where / "pruned.onnx")
    return metrics, files


def write_artifacts(out: Path, spec: JobSpec, metrics: dict[str, Any], per_layer: pd.DataFrame,
                    coco: CocoResult) -> list[Path]:
    """metrics.json, the resolved config, per-layer sparsity and per-class AP CSVs, the COCO summary."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    per_layer.to_csv(out / "layer_sparsity.csv", index=False)
    coco.per_class.to_csv(out / "per_class_ap.csv", index=False)
    (out / "coco_summary.txt").write_text(coco.summary)
    (out / "config.yaml").write_text(spec.config_yaml)
    return [out / "config.yaml", out / "metrics.json", out / "layer_sparsity.csv", out / "per_class_ap.csv",
            out / "coco_summary.txt"]


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` CUDA's current device inside the block only (pinned memory, events and streams follow it)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        yield


@dataclass
class Measured:
    """A job's measurements while its COCO numbers (and its sizes) are still being computed elsewhere."""

    metrics: dict[str, Any]        # everything but the COCO numbers, the sizes and the waits
    files: list[Path]
    per_layer: pd.DataFrame
    allocation: pd.DataFrame | None
    shape: tuple[int, ...]
    coco: PendingEvaluation
    sizes: Future
    sw: Stopwatch
    forward_span: tuple[float, float]  # wall-clock (time.time()) start and end of the inference loop


def measure(spec: JobSpec, ctx: JobContext, memo: ProcessMemo) -> Measured:
    """The measured part of a job: everything up to handing its detections to the COCO worker (which
    evaluates them meanwhile) and the latency, profile and export stages that run while it does.
    :func:`complete_measure` turns it into (metrics, artifact files)."""
    device = torch.device(spec.eval.device)
    ev = spec.eval
    sw = Stopwatch(device)
    if ev.coco_worker:
        coco_worker().start()  # spawned while this job loads, prunes and runs the model
    if ev.gpu_shared:
        log.warning("%s: %s is also claimed by another process (more processes than GPUs): the ms figures measure "
                    "the contention too (tag %s)", spec.run_name, device, contract.TAG_GPU_SHARED)
    # status lines for the phases without a progress bar (a newcomer saw tens of silent seconds)
    log.info("%s: loading the model, %s %s, on %s", spec.run_name, spec.prune.method,
             "(fused first)" if spec.prune.fused else "(unfused)", device)
    with sw.stage("load_model"):
        ckpt = memo.checkpoint(spec.model.weights, spec.model.sha256)
        model = load_model(ckpt)
    with sw.stage("data"):
        data = memo.eval_data(spec.data, ev, int(ckpt.stride.max()), ckpt.names, spec.model.weights)
        calibration = memo.calibration(spec.recover, ev, data.files, device, ckpt.names)
    prune, allocation, alloc_metrics = spec.prune, None, {}
    if prune.method == "sensitivity" and spec.sparsity > 0:
        with sw.stage("allocate"):
            prune, allocation, alloc_metrics = allocate_layers(spec, ckpt, memo, data.files, device)
    model, recover_metrics = prune_and_recover(model, spec.sparsity, prune, spec.recover, calibration, sw)
    with sw.stage("dense_reference"):  # once per process and checkpoint (the memo keeps them)
        dense_figures = memo.dense_accounting(spec.model.sha256, ckpt.model, ev.imgsz)
        dense_model = memo.dense_model(spec.model.sha256, ckpt.model)
    with sw.stage("accounting"):
        acc, per_layer = account(model, spec, dense_figures, dense_model)
    sizes = in_background(size_figures, model.state_dict())  # evaluation changes no weight in place
    out = ctx.output_dir
    files: list[Path] = []
    with on_device(device):
        model = model.to(device).eval()
        if ev.half:
            model = model.half()
        if device.type == "cuda":  # val.py warms CUDA up before timing
            measure_latency(model, device=device, half=ev.half, imgsz=ev.imgsz, batch=1, iters=1, warmup=1)
        evaluator = CocoEvaluator(data.ground_truth, backend=ev.backend, image_ids=data.image_ids,
                                  class_map=data.class_map, bootstrap=ev.bootstrap)
        with gc_paused():  # the result rows live and die inside this block, unseen by the collector
            t_loop = time.time()
            with sw.stage("inference_loop"):
                loop = evaluate(model, data, memo.batches(data, ev.preprocessed, ev.cache_bytes), ev, device,
                                evaluator, f"{spec.model.name} s={contract.sparsity_label(spec.sparsity)}")
            forward_span = (t_loop, time.time())
            if ev.save_json:
                (out / "predictions.json").write_text(evaluator.predictions_json())
                files.append(out / "predictions.json")
            columns = evaluator.columns()
            del evaluator
        memo.complete_deferred()  # the previous point's COCO evaluation ran during this point's forward pass
        if ev.coco_worker:
            log.info("COCO evaluation of %d detections (%s) in the worker process...", loop.detections, ev.backend)
            coco = coco_worker().submit(data.key, data.ground_truth, columns, data.image_ids, ev.backend,
                                        ev.bootstrap)
        else:
            log.info("COCO evaluation of %d detections (%s)...", loop.detections, ev.backend)
            coco = evaluate_here(data.ground_truth, columns, data.image_ids, ev.backend, ev.bootstrap)
        lat: dict[str, float] = {}
        if ev.latency and "torch" in ev.runtimes:
            log.info("timing latency: batch 1 and %d, %d iterations each%s...", ev.batch, ev.latency_iters,
                     ", the dense model alternately" if spec.sparsity else "")
            with sw.stage("latency"):
                lat = latency(model, ev, device, _dense_reference(spec, ckpt, memo, device, ev.half))
        if ev.profile:
            log.info("profiling per-layer time (torch.profiler, batch 1)%s...", ", and the dense model" if spec.sparsity else "")
            with sw.stage("profile"):
                table = layer_time_table(model, _dense_reference(spec, ckpt, memo, device, ev.half), imgsz=ev.imgsz,
                                         device=device, half=ev.half)
            table.to_csv(out / contract.LAYER_PROFILE_CSV, index=False)
            files.append(out / contract.LAYER_PROFILE_CSV)
            lat |= {contract.PROFILE_MS_B1: float(table["ms"].sum()),
                    contract.PROFILE_DENSE_MS_B1: float(table["dense_ms"].sum())}
    if spec.prune.save or "onnxruntime" in ev.runtimes:
        dense = _dense_reference(spec, ckpt, memo)  # on the CPU in FP32, as the model is exported
        deployed, deployed_files = save_and_deploy(model, dense, spec, device, out, sw)
        lat |= deployed
        files += deployed_files

    for stage, seconds in loop.seconds.items():
        sw.add("forward" if stage == "inference" else stage, seconds)
    metrics: dict[str, Any] = loop.per_image_ms() | {
        "images": loop.images, "instances": data.instances, "detections": loop.detections,
        "images_skipped": len(data.skipped),
    } | acc | alloc_metrics | recover_metrics | lat
    metrics |= {"model": spec.model.name, "data": spec.data.name, "sparsity_target": spec.sparsity,
                "prune_method": spec.prune.method, "prune_fused": spec.prune.fused,
                "recover_method": spec.recover.method, "device": str(device), "half": ev.half,
                "config_hash": spec.config_hash}
    return Measured(metrics, files, per_layer, allocation, loop.shape, coco, sizes, sw, forward_span)


def complete_measure(spec: JobSpec, ctx: JobContext, m: Measured) -> tuple[dict[str, Any], list[Path]]:
    """Wait for the job's COCO numbers and sizes, then write its artifacts. Returns (metrics, artifact files).

    ``seconds_coco_wait`` is how long this waited (0 when the evaluation was done by then), ``seconds_coco_eval``
    how long the evaluation took where it ran; ``timeline.json`` has the wall-clock spans of the forward pass
    and the evaluation (benchmarks/overlap.py draws them)."""
    t0 = time.perf_counter()
    done = m.coco.result()
    sizes = m.sizes.result()
    m.sw.add("coco_wait", time.perf_counter() - t0)
    m.sw.add("coco_eval", done.seconds)
    coco = done.result
    metrics = dict(coco.stats) | m.metrics | sizes | interval_metrics(coco) | m.sw.as_metrics()
    out = ctx.output_dir
    (out / "timeline.json").write_text(json.dumps({"forward": m.forward_span, "coco_eval": [done.started, done.ended],
                                                   "coco_where": done.where, "completed": time.time()}))
    _print_summary(spec, metrics, m.shape)
    files = m.files + write_artifacts(out, spec, metrics, m.per_layer, coco)
    if m.allocation is not None:
        files += write_allocation(m.allocation, out, spec.sparsity)
    return metrics, files


def _dense_reference(spec: JobSpec, ckpt: LoadedCheckpoint, memo: ProcessMemo, device: torch.device | str = "cpu",
                     half: bool = False) -> nn.Module | None:
    """The fused dense model timed against the job's (the process's one copy), or None for a dense job."""
    return memo.dense_model(spec.model.sha256, ckpt.model, device, half) if spec.sparsity else None


def interval_metrics(coco: CocoResult) -> dict[str, float]:
    """``<metric>_lo`` / ``<metric>_hi`` of every COCO number and the resample count (eval.bootstrap > 0)."""
    if not coco.resamples:
        return {}
    out: dict[str, float] = {contract.BOOTSTRAP_RESAMPLES: coco.resamples}
    for name, (lo, hi) in coco.intervals.items():
        lo_name, hi_name = contract.interval_metrics(name)
        out |= {lo_name: lo, hi_name: hi}
    return out


# ------------------------------------------------------------------------------- the job


def run_job(cfg: DictConfig, ctx: JobContext, memo: ProcessMemo | None = None) -> Outcome:
    """Run one job. Input errors are raised by the resolution, before any MLflow run is created;
    an error during the job ends its run FAILED and is re-raised."""
    memo = memo if memo is not None else ProcessMemo()
    spec = resolve_job(cfg, memo)
    return execute(spec, ctx, memo)


def execute(spec: JobSpec, ctx: JobContext, memo: ProcessMemo) -> Outcome:
    """Track and measure a resolved job (skipped when ``resume`` finds a FINISHED run of its config hash).

    A tracking store that does not answer within ``mlflow.retry_window`` never stops the job: it keeps
    evaluating and its complete record waits in the spool (``Outcome.pending``) until an upload."""
    if memo.is_deferred(spec.config_hash):  # the same point earlier in this sweep (e.g. the dense point of two
        memo.complete_deferred()            # methods): finished first, so resume reuses it instead of waiting
    tracker = connect(spec.track, memo) if spec.track.enabled else None
    if tracker is not None:
        try:
            if not ctx.sweep_id:  # a single run; a multirun's callback does this once at sweep start
                upload_pending(tracker, spec.track.spool)
                tracker.close_orphans()
            done = _finished_point(tracker, spec, ctx) if spec.resume else None
            if done is not None:
                return done
        except TrackingError as exc:
            log.warning("tracking store unavailable (%s): %s is evaluated without the resume check and its record "
                        "kept locally", exc, spec.run_name)
            memo.tracking_down.add(spec.track.uri)
            tracker = None

    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    sink = None
    if spec.track.enabled:
        sink = RunSink(tracker, spec.track.spool, RunRecord.of(spec.track, spec.run_name, sweep_id=ctx.sweep_id,
                                                               config_hash=spec.config_hash, tags=job_tags(spec, ctx)))
        sink.start()
        if spec.resume and sink.online:
            reused = _hold_or_reuse(sink, spec, ctx)
            if reused is not None:
                return reused
    with _run_ends_on_error(sink, ctx.output_dir):
        if sink is not None:
            sink.log(params=dict(spec.params))
        try:
            measured = measure(spec, ctx, memo)
        finally:  # the job's model and activations are gone: their cached blocks go back to the GPU
            release_cached_memory(torch.device(spec.eval.device))
    if memo.defer_completion and ctx.sweep_id:
        memo.deferred.append((spec.config_hash, lambda: _complete(spec, ctx, memo, sink, measured, deferred=True)))
        return Outcome("deferred", spec.run_name, sink.run_id if sink else None)
    return _complete(spec, ctx, memo, sink, measured, deferred=False)


def _complete(spec: JobSpec, ctx: JobContext, memo: ProcessMemo, sink: RunSink | None, measured: Measured,
              deferred: bool) -> Outcome:
    """The job's end once its COCO numbers are in: artifacts, metrics and the run's end. A deferred job (see
    ``ProcessMemo.defer_completion``) also records its outcome here, and never raises: its failure is its own."""
    try:
        with _run_ends_on_error(sink, ctx.output_dir):
            metrics, files = complete_measure(spec, ctx, measured)
            pending = False
            if sink is not None:
                sw = Stopwatch()
                with sw.stage("logging"):
                    sink.log(metrics=metrics)
                    sink.log_artifacts(files)
                    pending = sink.end("FINISHED")
                metrics.update(sw.as_metrics())
                if pending:
                    memo.tracking_down.add(spec.track.uri)
        reason = f"upload pending: {sink.spooled}" if pending and sink is not None else ""
        outcome = Outcome("done", spec.run_name, sink.run_id if sink else None, reason, metrics, pending=pending)
    except Exception as exc:
        if not deferred:
            raise
        outcome = failed_outcome(spec.run_name, exc)
    if deferred:
        report_outcome(outcome, ctx)
    return outcome


@contextlib.contextmanager
def _run_ends_on_error(sink: RunSink | None, output_dir: Path) -> Iterator[None]:
    """An interruption inside the block ends the job's run KILLED (Ctrl-C; submitit requeueing a preempted or
    timed-out job exits it), an error FAILED with its traceback; both are raised on."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        if sink is not None:
            sink.end("KILLED", quick=True)
        raise
    except Exception as exc:
        if sink is not None:
            _record_failure(sink, output_dir, exc)
        raise


def _finished_point(tracker: Tracker, spec: JobSpec, ctx: JobContext) -> Outcome | None:
    """The job's outcome when resume finds a FINISHED run of its config hash (the job is skipped), else None.

    ``eval.bootstrap`` is not in the config hash (it adds intervals, the numbers stay the same), so a finished
    run without the interval asked for is measured again rather than skipped."""
    prev = tracker.finished_run(spec.config_hash)
    if prev is None:
        return None
    if not contract.has_interval(prev.data.metrics, spec.eval.bootstrap):
        log.info("re-run %s: FINISHED run %s of config_hash %s has no %d-resample confidence interval "
                 "(eval.bootstrap)", spec.run_name, prev.info.run_id, spec.config_hash, spec.eval.bootstrap)
        return None
    log.info("skip %s: config_hash %s already has FINISHED run %s (%s); resume=false forces a re-run",
             spec.run_name, spec.config_hash, prev.info.run_id, prev.info.run_name)
    if ctx.sweep_id and prev.data.tags.get(contract.TAG_SWEEP_ID) != ctx.sweep_id:
        tracker.log(prev.info.run_id, tags={contract.also_in_sweep_tag(ctx.sweep_id): "true"})
    return Outcome("skipped", spec.run_name, prev.info.run_id, f"same config as run {prev.info.run_id}",
                   dict(prev.data.metrics))


def _hold_or_reuse(sink: RunSink, spec: JobSpec, ctx: JobContext) -> Outcome | None:
    """Evaluate each point once when sweeps overlap: None when this job holds the point (its run is the
    claim, see ``Tracker.claim``); else wait for the holder and reuse its result (this job's run is
    deleted). A holder that fails or is killed hands the point on: the claim is asked again."""
    tracker, run_id = sink.tracker, sink.run_id
    t0 = time.monotonic()
    try:
        while (holder := tracker.claim(spec.config_hash, run_id)) is not None:
            other = holder.data.tags.get(contract.TAG_SWEEP_ID, "a single run")
            log.info("%s is being evaluated by run %s (sweep %s, pid %s on %s): waiting for its result instead of "
                     "evaluating it twice", spec.run_name, holder.info.run_id, other,
                     holder.data.tags.get(contract.TAG_PID, "?"), holder.data.tags.get(contract.TAG_HOST, "?"))
            tracker.log(run_id, tags={contract.TAG_WAITING_FOR: holder.info.run_id})
            final = tracker.wait_for(holder.info.run_id)
            if final.info.status == "FINISHED":
                tracker.delete(run_id)
                if ctx.sweep_id and final.data.tags.get(contract.TAG_SWEEP_ID) != ctx.sweep_id:
                    tracker.log(final.info.run_id, tags={contract.also_in_sweep_tag(ctx.sweep_id): "true"})
                return Outcome("skipped", spec.run_name, final.info.run_id,
                               f"evaluated once for both: by concurrent {other} (run {final.info.run_id}); "
                               f"waited {time.monotonic() - t0:.0f} s", dict(final.data.metrics))
            log.info("run %s ended %s: %s evaluates the point itself", holder.info.run_id, final.info.status,
                     spec.run_name)
    except TrackingError as exc:  # cannot coordinate: evaluate (a duplicate is better than a lost point)
        log.warning("tracking store unavailable while claiming %s (%s): evaluating it", spec.run_name, exc)
        sink.tracker = None
    return None


def connect(spec: TrackSpec, memo: ProcessMemo) -> Tracker | None:
    """The job's tracker, or None when the store does not answer within its retry window (then the job's
    record is spooled). A store that already failed in this process gets one quick probe, not a new window."""
    window = 0.0 if spec.uri in memo.tracking_down else None
    try:
        tracker = Tracker.from_spec(spec, retry_window=window)
    except TrackingError as exc:
        log.warning("%s; the job runs and keeps its record in %s", exc, spec.spool)
        memo.tracking_down.add(spec.uri)
        return None
    memo.tracking_down.discard(spec.uri)
    return tracker


def job_tags(spec: JobSpec, ctx: JobContext) -> dict[str, str]:
    tags = environment_tags() | {
        contract.TAG_ROLE: contract.ROLE_JOB, contract.TAG_CONFIG_HASH: spec.config_hash,
        contract.TAG_OVERRIDES: " ".join(contract.redact(o) for o in ctx.overrides),
        contract.TAG_DEVICE_NAME: device_name(torch.device(spec.eval.device)),
        contract.TAG_OUTPUT_DIR: str(ctx.output_dir.resolve()),
    }
    if ctx.sweep_id:
        tags[contract.TAG_SWEEP_ID] = ctx.sweep_id
    if spec.eval.gpu_shared:
        tags[contract.TAG_GPU_SHARED] = "true"
    return tags


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``), not just its architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _record_failure(sink: RunSink, output_dir: Path, exc: BaseException) -> None:
    tb = output_dir / "traceback.txt"
    tb.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        sink.log_artifacts([tb])
        sink.log(tags={contract.TAG_ERROR: f"{type(exc).__name__}: {exc}"})
        sink.end("FAILED")
    except Exception as log_exc:  # noqa: BLE001 - the job's own error matters more
        log.error("could not record the failure in MLflow: %s", log_exc)


def _print_summary(spec: JobSpec, m: dict[str, Any], shape: tuple[int, ...]) -> None:
    p = spec.prune
    method = p.method + ("" if p.fused else " (unfused)")
    if spec.recover.method != "none":
        method += f" + recover={spec.recover.method}"
    if p.method == "channel":
        measured = f"params {m.get('params_ratio', 1.0):.0%} of dense, GFLOPs {m.get('gflops_ratio', 1.0):.0%}"
        what = "channel ratio"
    else:
        measured, what = f"measured {m.get('sparsity', 0.0):.3f}", "sparsity"
    log.info("%s %s %s %.2f (%s) on %s: images %d, instances %d", spec.model.name, method, what, spec.sparsity,
             measured, spec.data.name, m["images"], m["instances"])
    log.info("mAP50 %.3f  mAP50-95 %.3f  AR100 %.3f", m["mAP50"], m["mAP50-95"], m["AR100"])
    log.info("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape %s",
             m["ms_preprocess"], m["ms_inference"], m["ms_nms"], shape)


# ------------------------------------------------------------------------------- Hydra task


def task(cfg: DictConfig, memo: ProcessMemo) -> Outcome:
    """Hydra task: run one job with its HydraConfig context; never let one failed job stop a sweep.

    Single run: a failure prints one clear message and exits with status 2 (bad input) or 1.
    Multirun: the failure is logged and recorded in ``outcome.json``; the end-of-sweep callback
    prints the summary and sets the exit status.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    ctx = JobContext(output_dir=Path(hc.runtime.output_dir),
                     sweep_id=Path(hc.sweep.dir).name if multirun else None,
                     overrides=list(hc.overrides.task), job_num=hc.job.num if multirun else 0)
    name = _name_for_messages(cfg)
    try:
        outcome = run_job(cfg, ctx, memo)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP turned into one by the entry point
        Outcome("failed", name, None, f"interrupted ({exc or 'Ctrl-C'})").save(ctx.output_dir)
        _complete_earlier_jobs(memo)
        _mark_parent_killed(cfg, ctx.sweep_id)
        raise
    except Exception as exc:  # noqa: BLE001 - every job failure is reported the same way
        outcome = failed_outcome(name, exc, multirun)
        outcome.save(ctx.output_dir)
        if not multirun:
            print(f"error: {outcome.reason}", file=sys.stderr)
            sys.exit(2 if isinstance(exc, USER_ERRORS) else 1)
        return outcome
    if outcome.status == "deferred":  # its completion records it (after the next point's forward pass)
        return outcome
    report_outcome(outcome, ctx)
    if outcome.pending and not multirun:
        print(pending_message(1, resolve_tracking(cfg)), file=sys.stderr)
        sys.exit(EXIT_PENDING)
    return outcome


def failed_outcome(name: str, exc: BaseException, multirun: bool = True) -> Outcome:
    """A failed job's outcome: a user error's message as it is (it names the key and value), anything else
    with its type and the traceback in the log (a multirun also logs the message: its summary comes later)."""
    user_error = isinstance(exc, USER_ERRORS)
    reason = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
    if not user_error:
        log.error("job %s failed:\n%s", name, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if multirun:
        log.error("job %s failed: %s", name, reason)
    return Outcome("failed", name, None, reason)


def report_outcome(outcome: Outcome, ctx: JobContext) -> None:
    """``outcome.json`` in the job's folder (the sweep's summary reads it) and the job's last log line."""
    outcome.save(ctx.output_dir)
    m = outcome.metrics
    if outcome.status == "done":
        log.info("done %s: mAP50-95 %.4f  AR100 %.4f  %.1f ms/img -> %s", outcome.name, m.get("mAP50-95", 0),
                 m.get("AR100", 0), m.get("ms_inference", 0), ctx.output_dir)


def _complete_earlier_jobs(memo: ProcessMemo) -> None:
    """On an interruption: the jobs waiting for their COCO numbers are completed (the worker ignores Ctrl-C and
    has them within seconds) rather than lost; a second interruption gives up on them (their runs stay RUNNING
    until the next sweep's start closes them as orphans, and resume evaluates them again)."""
    if memo.deferred:
        log.warning("interrupted: completing %d earlier job(s) whose COCO evaluation is in the worker process",
                    len(memo.deferred))
    try:
        memo.complete_deferred()
    except BaseException as exc:  # noqa: BLE001 - already stopping
        log.error("earlier jobs not completed (%s)", type(exc).__name__)
        memo.deferred.clear()
    coco_worker().stop()


def _mark_parent_killed(cfg: DictConfig, sweep_id: str | None) -> None:
    """Ctrl-C stops the sweep: its parent run is marked KILLED too (best effort)."""
    if not (sweep_id and cfg.mlflow.enabled):
        return
    try:
        tracker = Tracker.from_spec(resolve_tracking(cfg), retry_window=0)
        parent = tracker.parent_run(sweep_id)
        if parent is not None:
            tracker.end(parent.info.run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - we are already stopping
        log.warning("could not mark the sweep's parent run KILLED: %s", exc)


def _name_for_messages(cfg: DictConfig) -> str:
    """The run name from the raw config, for messages about a job that may not resolve."""
    try:
        return contract.run_name(str(cfg.model.name), str(cfg.prune.method), bool(cfg.prune.fused),
                                 str(cfg.recover.method), float(cfg.sparsity))
    except Exception:  # noqa: BLE001 - a name for messages only
        return "job"
