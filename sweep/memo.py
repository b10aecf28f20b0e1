"""Per-process reuse across the jobs of a sweep: what a later job of the same process need not redo.

With the default (sequential) launcher every job of a multirun runs in one process. The
``ProcessMemo`` keeps what does not depend on the pruning: each weights file hashed once, each
checkpoint loaded once (every job deep-copies its model), the dense model's cost figures, each
dataset scanned once and its decoded batches (in memory when they fit ``eval.cache_gb``,
else streamed from the on-disk cache every pass, holding nothing), the calibration images, and the
sensitivity curves of ``prune=sensitivity`` (also kept on disk, measured once per model and images).
It resolves nothing and checks nothing itself: ``sweep.config.resolve`` decides what to open.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from sweep.assets import file_sha256
from sweep.config.spec import DataSpec, EvalSpec, PruneSpec, RecoverSpec
from sweep.evaluate.device import GpuClaim, claim_gpu, claims_folder, visible_gpu_ids
from sweep.data import Batch, DataError, Dataset, PreprocessedCache, label_path, load_ground_truth
from sweep.assets import writable
from sweep.model import LoadedCheckpoint, fuse, load_checkpoint
from sweep.prune import accounting, select_convs, sensitivity
from sweep.prune.sensitivity import Curve, CurveStore, curve_key
from sweep.recover import Calibration, calibration_images

log = logging.getLogger(__name__)

@dataclass
class EvalData:
    """A dataset ready for evaluation: its images and labels, ground truth and category ids."""

    dataset: Dataset
    ground_truth: dict[str, Any]
    class_map: list[int]
    instances: int
    batches: list[Batch] | None = None   # decoded, once a full pass was kept in memory
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # names its ground truth in the COCO worker

    @property
    def files(self) -> list[str]:
        return list(self.dataset.files)

    @property
    def image_ids(self) -> list[Any]:
        return list(self.dataset.image_ids)

    @property
    def skipped(self) -> list[Any]:
        return list(self.dataset.skipped)

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass
class ProcessMemo:
    hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)
    checkpoints: dict[str, LoadedCheckpoint] = field(default_factory=dict)
    dense: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    dense_models: dict[tuple[str, str, bool], torch.nn.Module] = field(default_factory=dict)
    data: dict[tuple, EvalData] = field(default_factory=dict)
    calib: dict[tuple, Calibration] = field(default_factory=dict)
    tracking_down: set[str] = field(default_factory=set)  # store URIs that failed past their retry window here
    curves: dict[str, list[Curve]] = field(default_factory=dict)
    gpu: GpuClaim | None = None  # this process's GPU under eval.device=auto|cuda, claimed at its first CUDA job
    # Set by the sweep callback in the process that runs the sweep's jobs itself (the sequential launcher): a job
    # then leaves its completion (waiting for its COCO numbers, logging them, ending its run) to run after the
    # next point's forward pass, or at the sweep's end (``complete_deferred``).
    defer_completion: bool = False
    deferred: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)  # (config hash, complete)

    def complete_deferred(self) -> None:
        """Complete every deferred job, oldest first (each records its own failure; none raises)."""
        while self.deferred:
            self.deferred.pop(0)[1]()

    def is_deferred(self, config_hash: str) -> bool:
        """A job of this config hash waits here for its completion (a later job of the same point must not
        wait for its run: it would wait for itself)."""
        return any(h == config_hash for h, _ in self.deferred)

    # -- device -------------------------------------------------------------------------------
    def gpu_claim(self) -> GpuClaim:
        """The GPU this process claimed for its lifetime (``sweep.evaluate.device.claim_gpu``), claimed once."""
        if self.gpu is None:
            self.gpu = claim_gpu(visible_gpu_ids(), claims_folder())
            log.info("this process (pid %d) evaluates on cuda:%d%s", os.getpid(), self.gpu.index,
                     ", shared with another process (more processes than GPUs)" if self.gpu.shared else "")
        return self.gpu

    # -- weights ------------------------------------------------------------------------------
    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self.hashes:
            self.hashes[key] = file_sha256(path)
        return self.hashes[key]

    def checkpoint(self, path: Path, sha256: str) -> LoadedCheckpoint:
        """The loaded checkpoint (pristine: callers deep-copy its model before changing it)."""
        if sha256 not in self.checkpoints:
            self.checkpoints.clear()  # one model at a time: a grid sweeps sparsity within each model
            self.checkpoints[sha256] = load_checkpoint(path, sha256)
        return self.checkpoints[sha256]

    def dense_model(self, sha256: str, pristine: torch.nn.Module, device: torch.device | str = "cpu",
                    half: bool = False) -> torch.nn.Module:
        """The dense model fused (and moved/cast as asked), built once per process and checkpoint: the
        reference for cost ratios and the speed-ups timed against it. Callers only run it, never change it."""
        key = (sha256, str(device), bool(half))
        if key not in self.dense_models:
            self.dense_models = {k: v for k, v in self.dense_models.items() if k[0] == sha256}  # one checkpoint
            model = fuse(copy.deepcopy(pristine).float().eval()).to(device)
            self.dense_models[key] = model.half() if half else model
        return self.dense_models[key]

    def dense_accounting(self, sha256: str, pristine: torch.nn.Module, imgsz: int) -> dict[str, Any]:
        """Cost figures of the dense fused model (the reference for params/GFLOPs ratios)."""
        key = (sha256, imgsz)
        if key not in self.dense:
            self.dense[key] = accounting(self.dense_model(sha256, pristine), None, imgsz)[0]
        return self.dense[key]

    # -- data ---------------------------------------------------------------------------------
    def eval_data(self, spec: DataSpec, ev: EvalSpec, stride: int, model_names: list[str],
                  weights: Path) -> EvalData:
        """The evaluation data at ``ev``'s imgsz/batch and the model's stride: every image checked and
        every label read here (a bad label or class id is an error before any run exists)."""
        key = (spec, ev.imgsz, stride, ev.batch, tuple(model_names))
        if key in self.data:
            return self.data[key]
        names = list(spec.names) if spec.names is not None else list(model_names)
        try:
            ds = Dataset(spec.val, names, imgsz=ev.imgsz, stride=stride, batch=ev.batch, limit=spec.limit,
                         workers=ev.workers, coco80_to_91=spec.coco80_to_91)
        except DataError as e:
            if spec.names is None and "out of range" in str(e):
                raise DataError(f"{e} of the checkpoint model.weights={str(weights)!r} ({len(names)} classes): "
                                f"the labels of data {spec.name!r} are not for this model") from None
            raise
        log.info("reading the labels of %d images of %s (once per process)", len(ds), spec.name)
        gt, instances = load_ground_truth(ds, spec.annotations)
        if instances == 0:
            raise DataError(f"data {spec.name!r}: no labelled object in its {len(ds)} images (no label files "
                            f"beside them? expected e.g. {label_path(ds.files[0])}); allowed is a "
                            "dataset with YOLO label files or a COCO annotations JSON")
        data = EvalData(ds, gt, list(ds.class_map), instances)
        self.data = {k: v for k, v in self.data.items() if k[0] == spec}  # keep one dataset's settings
        self.data[key] = data
        return data

    def batches(self, data: EvalData, preprocessed: Path | None, limit_bytes: int = EvalSpec.cache_bytes
                ) -> Iterable[Batch]:
        """Decoded batches: from memory after a first full pass when the set fits ``limit_bytes``
        (``eval.cache_gb``); else from the on-disk cache under ``preprocessed`` (when given and writable);
        else decoded."""
        fits = data.dataset.nbytes <= limit_bytes
        if data.batches is not None and fits:
            return data.batches
        data.batches = None  # a smaller limit than a previous job's: let go of what it kept
        source = self._decoded(data.dataset, preprocessed)
        if not fits:
            return source  # streamed every pass: nothing is held beyond the batches in flight
        return self._pass_and_keep(data, source)

    @staticmethod
    def _decoded(dataset: Dataset, preprocessed: Path | None) -> Iterable[Batch]:
        if preprocessed is not None:
            if writable(preprocessed):
                return PreprocessedCache(preprocessed).batches(dataset)
            log.info("preprocessed cache %s is read-only: decoding images instead", preprocessed)
        return dataset.iter_batches()

    @staticmethod
    def _pass_and_keep(data: EvalData, source: Iterable[Batch]) -> Iterator[Batch]:
        """Yield ``source`` and keep every batch: a pass that runs to its end fills ``data.batches``."""
        kept = []
        for b in source:
            kept.append(b)
            yield b
        data.batches = kept

    # -- recovery -----------------------------------------------------------------------------
    def calibration(self, spec: RecoverSpec | None, ev: EvalSpec, eval_files: list[str], device: torch.device,
                    names: list[str] | None = None) -> Calibration | None:
        """Calibration (and, for methods that train, labeled training) images for ``spec`` (None for
        ``recover=none``, and for a prune method without curves: ``PruneSpec.calibration`` None), checked
        against the evaluation images."""
        if spec is None or spec.source is None:
            return None
        key = (spec, ev.imgsz, ev.workers, tuple(eval_files), str(device), tuple(names or ()))
        if key not in self.calib:
            kept = list(self.calib.items())[-1:]  # two sets at most: recover's and prune=sensitivity's
            self.calib = dict(kept) | {
                key: calibration_images(spec, ev.imgsz, ev.workers, eval_files, device, names, ev.progress)}
        return self.calib[key]

    # -- sensitivity curves ---------------------------------------------------------------------
    def sensitivity_curves(self, spec: PruneSpec, ckpt: LoadedCheckpoint, calibration: Calibration,
                           device: torch.device) -> tuple[list[Curve], str, float]:
        """The curves of ``spec``'s selected layers of ``ckpt`` (fused as ``spec.fused``) on ``calibration``:
        from this process, else from the disk cache ``spec.curves``, else measured (and stored there).
        Returns ``(curves, where: memo | disk | measured, seconds spent measuring)``."""
        layers = select_convs(ckpt.model, spec.include, spec.exclude)  # the same names fused or not
        key = curve_key(ckpt.sha256, spec.fused, [(n, m.weight.numel()) for n, m in layers.items()], spec.levels,
                        calibration.files, calibration.imgsz, torch.device(device).type)
        if key in self.curves:
            return self.curves[key], "memo", 0.0
        store = CurveStore(spec.curves)
        with store.lock(key):  # workers missing the same curves at once: one measures, the others read its file
            curves, where, seconds = store.load(key), "disk", 0.0
            if curves is None:
                model = copy.deepcopy(ckpt.model).float().eval()
                model = fuse(model) if spec.fused else model
                t0 = time.perf_counter()
                curves = sensitivity.measure_curves(model, select_convs(model, spec.include, spec.exclude),
                                                    calibration.batches(), spec.levels, device)
                where, seconds = "measured", time.perf_counter() - t0
                log.info("sensitivity curves: %d layers x %d levels on %d images in %.0fs", len(curves),
                         len(spec.levels), len(calibration), seconds)
                store.save(key, curves, seconds)
        self.curves = {key: curves}  # one model's at a time, like the checkpoints
        return curves, where, seconds


_PER_PROCESS: dict[int, ProcessMemo] = {}


def process_memo() -> ProcessMemo:
    """This process's memo, shared by every job the process runs: the main process of a sequential sweep, or
    each joblib / submitit worker (the task function reaches it by module reference, so launchers no longer
    pickle a fresh, empty memo into every job). Keyed by pid: a forked child starts its own."""
    pid = os.getpid()
    if pid not in _PER_PROCESS:
        _PER_PROCESS.clear()
        _PER_PROCESS[pid] = ProcessMemo()
    return _PER_PROCESS[pid]
