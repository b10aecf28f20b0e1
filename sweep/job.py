"""One sweep job: validate -> fresh pretrained model -> prune (-> recover) -> evaluate -> log.

``run_job(cfg, ctx, cache)`` is the whole job as a plain function (tests call it directly);
``task(cfg, cache)`` is the Hydra task wrapper: it turns failures into one clear message,
records the outcome for the end-of-sweep summary, and never lets a failed job stop a sweep.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sweep.config.schema import ConfigError, validate
from sweep.memo import SessionCache
from sweep.evaluate.timing import Stopwatch

log = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"


@dataclass
class JobContext:
    """Where a job writes and how it belongs to a sweep (filled from HydraConfig by ``task``)."""

    output_dir: Path
    sweep_id: str | None = None
    overrides: list[str] = field(default_factory=list)
    job_num: int = 0


@dataclass
class JobOutcome:
    status: str                    # done | skipped | failed
    name: str
    run_id: str | None = None
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["metrics"] = {k: v for k, v in self.metrics.items() if k in SUMMARY_KEYS}
        (output_dir / OUTCOME_FILE).write_text(json.dumps(data, indent=2))


SUMMARY_KEYS = ("mAP50-95", "mAP50", "AR100", "sparsity", "ms_inference")


def run_name(cfg: DictConfig) -> str:
    """``<model>-<method>[-<recover>]-s<sparsity>``, e.g. ``yolov5x-l1_unstructured-s0.30``."""
    method = cfg.prune.method + ("" if cfg.prune.fused else "-unfused")
    recover = "" if cfg.recover.method == "none" else f"-{cfg.recover.method}"
    return f"{cfg.model.name}-{method}{recover}-s{float(cfg.sparsity):.2f}"


def check_choices(cfg: DictConfig) -> None:
    """Registry names and combinations, checked before any work."""
    from sweep.evaluate.coco import EVALUATORS
    from sweep.prune.methods import PRUNERS
    from sweep.recover.methods import RECOVERERS

    for key, value, registry in (("prune.method", cfg.prune.method, PRUNERS),
                                 ("recover.method", cfg.recover.method, RECOVERERS),
                                 ("eval.backend", cfg.eval.backend, EVALUATORS)):
        if value not in registry:
            raise ConfigError(f"{key}={value!r} is unknown: allowed are {', '.join(sorted(registry))}")
    if cfg.recover.method != "none" and cfg.prune.fused:
        raise ConfigError(f"recover.method={cfg.recover.method!r} needs prune.fused=false (recovery works on the "
                          "unfused model's BatchNorm layers, before fusion); prune.fused=true is not allowed with it")


def semantic_config(cfg: DictConfig, weights_sha256: str, device: torch.device, half: bool) -> dict[str, Any]:
    """The settings that determine a job's numbers (hashed into ``config_hash``).

    At sparsity 0 (and no recovery) every pruning method is the same dense model, so the
    pruning options are left out: a dense point is evaluated once per model and data.
    """
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    prune = {k: v for k, v in c["prune"].items() if k != "save"}
    dense = float(cfg.sparsity) == 0.0 and cfg.recover.method == "none"
    recover = c["recover"] if cfg.recover.method != "none" else {"method": "none"}
    e = c["eval"]
    data = {k: c["data"].get(k) for k in ("name", "val", "annotations", "limit", "coco80_to_91")}
    if c["data"].get("yaml"):
        data["yaml"] = str(Path(c["data"]["yaml"]).resolve())
    return {
        "weights_sha256": weights_sha256,
        "data": data,
        "prune": None if dense else prune,
        "recover": recover,
        "sparsity": float(cfg.sparsity),
        "eval": {k: e[k] for k in ("imgsz", "batch", "conf", "iou", "max_det")} | {
            "device": device.type, "half": half},
    }


def environment_tags() -> dict[str, str]:
    tags = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "None",
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": str(os.getpid()),  # with host: lets a later sweep close the run if this process dies
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        if commit:
            tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def run_job(cfg: DictConfig, ctx: JobContext, cache: SessionCache | None = None) -> JobOutcome:
    """Run one job. Input errors (ConfigError, AssetError, DataError, ...) are raised before any MLflow
    run is created; an error during the job ends its run FAILED and is re-raised."""
    from sweep import assets
    from sweep.evaluate.loop import resolve_device
    from sweep.process import keep_freed_memory
    from sweep.track.tracker import Tracker, config_hash, resolved_params

    cache = cache if cache is not None else SessionCache()
    cfg = copy.deepcopy(cfg)
    # --- pre-flight: everything that can be wrong with the input, before any run exists ---
    validate(cfg)
    check_choices(cfg)
    device, half = resolve_device(str(cfg.eval.device), cfg.eval.half, ctx.job_num)
    keep_freed_memory(bool(cfg.eval.reuse_host_memory))  # process-wide; numbers are identical either way
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # pinned memory, CUDA events and streams follow the job's GPU
    cache_dir = assets.cache_root(cfg.paths.cache)
    weights = cache.weights_path(cfg.model, cache_dir)
    data_spec = cache.data_spec(cfg.data, cache_dir)
    calibration = cache.calibration(cfg, data_spec, device)  # refuses evaluation images before any run
    sha = cache.sha256(weights)
    name = run_name(cfg)
    chash = config_hash(semantic_config(cfg, sha, device, half))

    tracker = None
    if cfg.mlflow.enabled:
        tracker = Tracker.from_config(cfg)
        if not ctx.sweep_id:  # a single run; a multirun's callback does this once at sweep start
            tracker.close_orphans()
        if cfg.resume:
            prev = tracker.finished_run(chash)
            if prev is not None:
                log.info("skip %s: config_hash %s already has FINISHED run %s (%s); resume=false forces a re-run",
                         name, chash, prev.info.run_id, prev.info.run_name)
                if ctx.sweep_id and prev.data.tags.get("sweep_id") != ctx.sweep_id:
                    tracker.log(prev.info.run_id, tags={f"also_in_sweep.{ctx.sweep_id}": "true"})
                return JobOutcome("skipped", name, prev.info.run_id, f"same config as run {prev.info.run_id}",
                                  dict(prev.data.metrics))

    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    run_id = None
    if tracker is not None:
        parent = tracker.parent_run(ctx.sweep_id) if ctx.sweep_id else None
        tags = environment_tags() | {
            "sweep.role": "job", "config_hash": chash, "overrides": " ".join(ctx.overrides),
            "device_name": _device_name(device), "output_dir": str(ctx.output_dir.resolve()),
        }
        if ctx.sweep_id:
            tags["sweep_id"] = ctx.sweep_id
        run_id = tracker.start_run(name, tags, parent.info.run_id if parent else None)
    try:
        params = resolved_params(cfg) | {"model.weights": str(weights), "model.sha256": sha,
                                         "eval.device": str(device), "eval.half": half}
        if tracker is not None:
            tracker.log(run_id, params=params)
        metrics, files = _evaluate_job(cfg, ctx, cache, weights, data_spec, calibration, device, half, chash)
        if tracker is not None:
            sw = Stopwatch()
            with sw.stage("logging"):
                tracker.log(run_id, metrics=metrics)
                tracker.log_artifacts(run_id, files)
                tracker.end(run_id, "FINISHED")
            metrics.update(sw.as_metrics())
        return JobOutcome("done", name, run_id, "", metrics)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; submitit requeueing a preempted/timed-out job exits it
        if tracker is not None and run_id:
            tracker.end(run_id, "KILLED")
        raise
    except Exception as exc:
        if tracker is not None and run_id:
            _record_failure(tracker, run_id, ctx.output_dir, exc)
        raise


def _record_failure(tracker: Any, run_id: str, output_dir: Path, exc: BaseException) -> None:
    tb = output_dir / "traceback.txt"
    tb.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        tracker.log_artifacts(run_id, [tb])
        tracker.fail(run_id, f"{type(exc).__name__}: {exc}")
    except Exception as log_exc:  # noqa: BLE001 - the job's own error matters more
        log.error("could not record the failure in MLflow: %s", log_exc)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _evaluate_job(cfg: DictConfig, ctx: JobContext, cache: SessionCache, weights: Path, data_spec: Any,
                  calibration: Any, device: torch.device, half: bool, config_hash: str) -> tuple[dict[str, Any], list[Path]]:
    """The measured part of a job. Returns (metrics, artifact files)."""
    from sweep.model.checkpoint import save_checkpoint
    from sweep.evaluate.coco import CocoEvaluator
    from sweep.prune.accounting import accounting
    from sweep.evaluate.loop import gc_paused, measure_latency, run_inference
    from sweep.model.yolo import fuse
    from sweep.prune.methods import PRUNERS, select_convs
    from sweep.recover.methods import RECOVERERS

    sw = Stopwatch(device)
    with sw.stage("load_model"):
        ckpt = cache.checkpoint(weights)
        model = copy.deepcopy(ckpt.model).float().eval()
    with sw.stage("data"):
        dataset = cache.dataset(data_spec, cfg, stride=int(ckpt.stride.max()), names=ckpt.names)
    with sw.stage("prune"):
        sparsity = float(cfg.sparsity)
        if cfg.prune.fused:
            model = fuse(model)
        selected = list(select_convs(model, cfg.prune.include, cfg.prune.exclude))
        if cfg.prune.include and not selected:
            raise ConfigError(f"prune.include={list(cfg.prune.include)!r} matches no Conv2d of {cfg.model.name}: "
                              "allowed are glob patterns over module names, e.g. model.3.conv or model.24.*")
        if sparsity > 0:
            model = PRUNERS[cfg.prune.method](model, sparsity, cfg.prune)
    recover_metrics: dict[str, Any] = {}
    with sw.stage("recover"):
        if cfg.recover.method != "none":
            recover_metrics = RECOVERERS[cfg.recover.method](model, cfg, calibration)
    if not cfg.prune.fused:
        model = fuse(model)
    with sw.stage("accounting"):  # on the FP32 model, before any FP16 conversion
        selected_after = list(select_convs(model, cfg.prune.include, cfg.prune.exclude))
        dense = cache.dense_accounting(weights, ckpt.model, int(cfg.eval.imgsz))
        acc, per_layer = accounting(model, selected_after, int(cfg.eval.imgsz), sparsity, reference=dense)
    model = model.to(device).eval()
    if half:
        model = model.half()
    if device.type == "cuda":  # val.py warms CUDA up before timing
        measure_latency(model, device=device, half=half, imgsz=int(cfg.eval.imgsz), batch=1, iters=1, warmup=1)
    evaluator = CocoEvaluator(dataset.ground_truth, backend=cfg.eval.backend, image_ids=dataset.eval_image_ids)
    files: list[Path] = []
    out = ctx.output_dir
    with gc_paused():  # the result rows live and die inside this block, unseen by the collector
        with sw.stage("inference_loop"):
            bar = _progress(cfg, dataset)
            loop = run_inference(model, cache.batches(dataset, cfg.paths.preprocessed), evaluator, device=device,
                                 half=half, conf=float(cfg.eval.conf), iou=float(cfg.eval.iou),
                                 max_det=int(cfg.eval.max_det), class_map=dataset.class_map, progress=bar)
            if bar is not None:
                bar.close()
        with sw.stage("coco_eval"):
            coco = evaluator.compute()
        if cfg.eval.save_json:
            (out / "predictions.json").write_text(json.dumps(evaluator.rows))
            files.append(out / "predictions.json")
        del evaluator
    latency: dict[str, float] = {}
    if cfg.eval.latency:
        with sw.stage("latency"):
            imgsz, b = int(cfg.eval.imgsz), int(cfg.eval.batch)
            it = int(cfg.eval.latency_iters)
            latency["latency_b1_ms"] = measure_latency(model, device=device, half=half, imgsz=imgsz, batch=1,
                                                       iters=it)
            latency[f"latency_b{b}_ms_per_image"] = measure_latency(
                model, device=device, half=half, imgsz=imgsz, batch=b, iters=max(1, it // 4 if device.type == "cpu"
                                                                                 else it)) / b
    if cfg.prune.save:
        with sw.stage("save"):
            save_checkpoint(model, out / "pruned.pt")
            files.append(out / "pruned.pt")

    loop_s = loop.seconds
    sw.add("preprocess", loop_s["preprocess"])
    sw.add("forward", loop_s["inference"])
    sw.add("nms", loop_s["nms"])
    sw.add("postprocess", loop_s["postprocess"])
    metrics: dict[str, Any] = dict(coco.stats) | loop.per_image_ms() | {
        "images": loop.images, "instances": dataset.instances, "detections": loop.detections,
        "images_skipped": len(dataset.skipped),
    } | acc | recover_metrics | latency | sw.as_metrics()
    metrics |= {"model": cfg.model.name, "data": cfg.data.name, "sparsity_target": sparsity,
                "prune_method": cfg.prune.method, "prune_fused": bool(cfg.prune.fused),
                "recover_method": cfg.recover.method, "device": str(device), "half": half,
                "config_hash": config_hash}
    _print_summary(cfg, metrics, loop.shape)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    per_layer.to_csv(out / "layer_sparsity.csv", index=False)
    coco.per_class.to_csv(out / "per_class_ap.csv", index=False)
    (out / "coco_summary.txt").write_text(coco.summary)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    files += [out / "config.yaml", out / "metrics.json", out / "layer_sparsity.csv", out / "per_class_ap.csv",
              out / "coco_summary.txt"]
    return metrics, files


def _progress(cfg: DictConfig, dataset: Any) -> Any:
    if not cfg.eval.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=len(dataset), desc=f"{cfg.model.name} s={float(cfg.sparsity):.2f}", unit="img",
                leave=False, file=sys.stderr)


def _print_summary(cfg: DictConfig, m: dict[str, Any], shape: tuple[int, ...]) -> None:
    method = cfg.prune.method + ("" if cfg.prune.fused else " (unfused)")
    if cfg.recover.method != "none":
        method += f" + recover={cfg.recover.method}"
    log.info("%s %s sparsity %.2f (measured %.3f) on %s: images %d, instances %d", cfg.model.name, method,
             float(cfg.sparsity), m.get("sparsity", 0.0), cfg.data.name, m["images"], m["instances"])
    log.info("mAP50 %.3f  mAP50-95 %.3f  AR100 %.3f", m["mAP50"], m["mAP50-95"], m["AR100"])
    log.info("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape %s",
             m["ms_preprocess"], m["ms_inference"], m["ms_nms"], shape)


def task(cfg: DictConfig, cache: SessionCache) -> JobOutcome:
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
    name = _safe_name(cfg)
    try:
        outcome = run_job(cfg, ctx, cache)
    except KeyboardInterrupt:
        JobOutcome("failed", name, None, "interrupted (Ctrl-C)").save(ctx.output_dir)
        _mark_parent_killed(cfg, ctx.sweep_id)
        raise
    except Exception as exc:  # noqa: BLE001 - every job failure is reported the same way
        user_error = isinstance(exc, ConfigError) or _is_user_error(exc)
        reason = f"{type(exc).__name__}: {exc}" if not user_error else str(exc)
        if not user_error:
            log.error("job %s failed:\n%s", name, traceback.format_exc())
        outcome = JobOutcome("failed", name, None, reason)
        outcome.save(ctx.output_dir)
        if not multirun:
            print(f"error: {reason}", file=sys.stderr)
            sys.exit(2 if user_error else 1)
        log.error("job %s failed: %s", name, reason)
        return outcome
    outcome.save(ctx.output_dir)
    m = outcome.metrics
    if outcome.status == "done":
        log.info("done %s: mAP50-95 %.4f  AR100 %.4f  %.1f ms/img", name, m.get("mAP50-95", 0), m.get("AR100", 0),
                 m.get("ms_inference", 0))
    return outcome


def _mark_parent_killed(cfg: DictConfig, sweep_id: str | None) -> None:
    """Ctrl-C stops the sweep: its parent run is marked KILLED too (best effort)."""
    if not (sweep_id and cfg.mlflow.enabled):
        return
    try:
        from sweep.track.tracker import Tracker

        tracker = Tracker.from_config(cfg, retries=0)
        parent = tracker.parent_run(sweep_id)
        if parent is not None:
            tracker.end(parent.info.run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - we are already stopping
        log.warning("could not mark the sweep's parent run KILLED: %s", exc)


def _safe_name(cfg: DictConfig) -> str:
    try:
        return run_name(cfg)
    except Exception:  # noqa: BLE001 - a name for messages only
        return "job"


def _is_user_error(exc: BaseException) -> bool:
    """Errors whose message already says what is wrong with the user's input."""
    from sweep.assets import AssetError
    from sweep.model.checkpoint import CheckpointError
    from sweep.data.dataset import DataError
    from sweep.track.tracker import TrackingError

    return isinstance(exc, (AssetError, CheckpointError, DataError, TrackingError))
