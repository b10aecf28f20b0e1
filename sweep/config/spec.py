"""The resolved job: typed, frozen specs that components take instead of the raw config.

``sweep.config.resolve.resolve_job`` builds a :class:`JobSpec` from the composed Hydra config
once, before any MLflow run exists: every value checked, every path resolved (and a missing
official file downloaded), sparsity normalised. Each component receives only its own part
(``PruneSpec`` for a pruner, ``RecoverSpec`` for a recoverer, ``TrackSpec`` for the tracker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

Source = str | tuple[str, ...]  # an images folder, a .txt list file, or several of them (absolute paths)


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # label in run names and plots
    weights: Path             # the checkpoint file (exists)
    sha256: str


@dataclass(frozen=True)
class DataSpec:
    """A dataset on disk. ``val``/``train``: absolute image folders or list files."""

    name: str
    root: Path
    val: Source
    train: Source | None = None
    annotations: Path | None = None   # official COCO JSON (the ground truth) when present
    coco80_to_91: bool = False
    names: tuple[str, ...] | None = None
    limit: int | None = None


@dataclass(frozen=True)
class PruneSpec:
    """``levels``/``images``/``batch``/``source``/``source_key``/``allow_eval_images``/``curves``:
    ``sensitivity``'s curve measurement (its calibration images: ``source``, resolved as recover's, None for
    the other methods; ``allow_eval_images`` is ``recover.allow_eval_images``). ``allocation``: ``(layer,
    zeros)`` per selected conv, filled by the job's allocation stage (empty until then)."""

    method: str
    fused: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    round_to: int = 8
    save: bool = False
    levels: tuple[float, ...] = ()
    images: int = 8
    batch: int = 8
    source: Source | None = None
    source_key: str = ""
    allow_eval_images: bool = False
    curves: Path | None = None        # on-disk curve cache folder (paths.curves), None: in the process only
    allocation: tuple[tuple[str, int], ...] = ()

    @property
    def calibration(self) -> "RecoverSpec | None":
        """The curve measurement's calibration images, described as ``recover=bn``'s are (None: no source)."""
        if self.source is None:
            return None
        return RecoverSpec("bn", self.source, self.source_key, self.images, self.batch, self.allow_eval_images)


@dataclass(frozen=True)
class RecoverSpec:
    """``source``: the calibration (finetune: also training) images, None for ``none``; ``source_key``:
    the config key it came from. ``hyp``: finetune's full hyperparameters as sorted (key, value) pairs."""

    method: str = "none"
    source: Source | None = None
    source_key: str = ""
    images: int = 128
    batch: int = 32
    allow_eval_images: bool = False
    epochs: int = 1
    iters: int | None = None
    augment: bool = True
    recalibrate: bool = True
    hyp: tuple[tuple[str, float], ...] = ()
    data_limit: int | None = None
    seed: int = 0

    @property
    def labeled(self) -> bool:
        """Whether the method trains on labels (its images must come with YOLO label files)."""
        return self.method == "finetune"


@dataclass(frozen=True)
class EvalSpec:
    imgsz: int = 640
    batch: int = 32
    conf: float = 0.001
    iou: float = 0.65
    max_det: int = 300
    device: str = "cpu"       # resolved: cpu | cuda:N
    half: bool = False        # resolved: FP16 only on CUDA
    backend: str = "faster"
    workers: int = 2
    save_json: bool = False
    latency: bool = True
    latency_iters: int = 30
    progress: bool = True
    preprocessed: Path | None = None  # on-disk decoded-batch cache folder, None: decode every time
    runtimes: tuple[str, ...] = ("torch",)  # latency measured in: torch, onnxruntime
    bootstrap: int = 0        # image resamples for the COCO numbers' confidence intervals, 0: none
    profile: bool = False     # per-layer time breakdown (torch.profiler) of the model and its dense reference
    coco_worker: bool = True  # COCO evaluation in a worker process (overlapped), else in this one
    cache_bytes: int = 3 * 1024**3  # decoded batches kept in memory up to this size (eval.cache_gb)
    gpu_shared: bool = False  # resolved: this process's claimed GPU is also claimed by another process


@dataclass(frozen=True)
class TrackSpec:
    enabled: bool = True
    uri: str = ""
    experiment: str = ""
    artifact_location: str | None = None
    retry_window: float = 300.0   # seconds (see sweep/config/schema.py)
    spool: Path | None = None     # where records wait while the store does not answer (absolute)


@dataclass(frozen=True)
class BudgetSpec:
    """The budget search's settings (``budget.*``, checked): judge points by ``metric`` >= ``keep`` x dense,
    search the multiples of ``tol`` in [0, ``hi``], ``points`` per round and open bracket (None: from the
    launcher)."""

    keep: float
    metric: str
    tol: float
    hi: float
    points: int | None = None


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    data: DataSpec
    prune: PruneSpec
    recover: RecoverSpec
    eval: EvalSpec
    track: TrackSpec
    sparsity: float            # normalised: [0, 1), 6 decimals
    resume: bool
    run_name: str
    config_hash: str           # of the settings that determine the numbers (resume key)
    params: Mapping[str, Any] = field(default_factory=dict)  # the flattened resolved config, for MLflow
    config_yaml: str = ""      # the resolved config as YAML (an artifact)

    @property
    def dense(self) -> bool:
        """Sparsity 0 without recovery: every pruning method gives the same dense model."""
        return self.sparsity == 0.0 and self.recover.method == "none"
