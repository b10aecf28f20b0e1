"""Typed config schema: the one place every default lives, and its explicit registration.

The YAML files under ``conf/`` select options and override values; they do not restate these
defaults. ``register_configs()`` puts the schemas into Hydra's ConfigStore; the entry point (and
tests) call it, never an import. What the values mean and which are allowed is checked once, by
``sweep.config.resolve`` (the job spec), never by the components.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sweep.contract import DEFAULT_EXPERIMENT, DEFAULT_OUTPUTS
from sweep.config.hyp import HYP_SCRATCH_LOW


class ConfigError(ValueError):
    """Bad user input in the config: the message names key, value and what is allowed."""


@dataclass
class ModelConfig:
    """Which pretrained checkpoint to evaluate.

    ``weights`` empty means ``<paths.cache>/weights/<name>.pt`` (downloaded from
    ``url`` when missing). ``name`` is the label used in run names and plots. ``imgsz``: the
    model's native evaluation size, used when ``eval.imgsz`` is not set (P6 models: 1280).
    """

    name: str = "yolov5s"
    weights: Optional[str] = None
    url: Optional[str] = None
    imgsz: Optional[int] = None


@dataclass
class DataConfig:
    """A YOLO-format dataset (optionally with an official COCO annotations JSON).

    ``path`` is the dataset root (empty: ``<paths.cache>/datasets/<name>``); ``val``/``train``
    are image folders (or list files) relative to it; labels live where ``/images/`` is replaced by ``/labels/``.
    ``yaml`` points at a YOLOv5 data yaml instead (``path``/``val``/``names`` read
    from it). ``limit`` keeps only the first N images (sorted by file name): for
    tests and smoke runs.
    """

    name: str = "coco"
    path: Optional[str] = None
    yaml: Optional[str] = None
    val: str = "images/val2017"
    train: Optional[str] = None
    annotations: Optional[str] = None
    coco80_to_91: bool = False
    names: Optional[list[str]] = None
    download: Optional[list[dict[str, Any]]] = None
    # archives of the train split alone, fetched only when a job needs it (a recovery's training or
    # calibration images): COCO's train2017 is 19 GB, too big to download with the validation set
    train_download: Optional[list[dict[str, Any]]] = None
    limit: Optional[int] = None


@dataclass
class PruneConfig:
    """How to prune. ``method`` is a key of ``sweep.prune.methods.PRUNERS``.

    ``sensitivity`` only: ``levels`` (the per-layer sparsities each layer's curve is measured at, in
    (0, 1); the largest bounds every layer's allocation), ``images`` and ``batch`` (the calibration
    images the curves are measured on: the first N of recover's source, i.e. ``recover.data`` else the
    dataset's train split, ``batch`` per forward pass; evaluated images refused unless
    ``recover.allow_eval_images``). Few images keep the one-off measurement short (layers x levels
    forward passes; docs/benchmarks.md).
    """

    method: str = "l1_unstructured"
    fused: bool = True
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    round_to: int = 8
    save: bool = False
    levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    images: int = 8
    batch: int = 8


@dataclass
class RecoverConfig:
    """Accuracy recovery after pruning. ``method`` is a key of ``sweep.recover.methods.RECOVERERS``.

    ``data``: where the images come from (an image folder, a ``.txt`` list, a YOLOv5 data yaml, or the
    name of a data config such as ``coco128``; default: the dataset's ``train`` split). ``images`` and
    ``batch``: BatchNorm recalibration's images and batch (finetune: also the training batch, nominal
    64 by gradient accumulation). The rest is ``finetune``'s: ``epochs`` of YOLOv5's recipe (an
    optional ``iters`` cap on training batches), ``augment`` (mosaic, affine, HSV, flips),
    ``recalibrate`` BatchNorm first, ``hyp`` (YOLOv5's hyp.scratch-low values, each overridable:
    ``recover.hyp.lr0=0.002``), ``data_limit`` (the first N training images), ``seed``.
    """

    method: str = "none"
    data: Optional[str] = None
    images: int = 128
    batch: int = 32
    allow_eval_images: bool = False
    epochs: int = 1
    iters: Optional[int] = None
    augment: bool = True
    recalibrate: bool = True
    hyp: dict[str, float] = field(default_factory=lambda: dict(HYP_SCRATCH_LOW))
    data_limit: Optional[int] = None
    seed: int = 0


@dataclass
class EvalConfig:
    """Evaluation settings, named as in YOLOv5 val.py (the tutorial ran iou=0.65)."""

    imgsz: Optional[int] = None  # null: the model's native size (model.imgsz), else 640
    batch: int = 32
    conf: float = 0.001
    iou: float = 0.65
    max_det: int = 300
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    half: Optional[bool] = None   # null: FP16 on CUDA, FP32 on CPU
    backend: str = "faster"       # faster-coco-eval; pycocotools gives the same 12 numbers (tested)
    workers: Optional[int] = None  # image-decoding threads; null: the CPUs this process may use, at most 8
    save_json: bool = False
    latency: bool = True          # latency on a synthetic input at batch 1 and batch `eval.batch`
    latency_iters: int = 30       # timed repetitions (batch 1; CPU batches: a tenth, at least 3) for median + quartiles
    # runtimes timed: torch (the latency above), onnxruntime (ONNX export of the evaluated model,
    # checked against PyTorch's outputs, timed at batch 1 and `eval.batch`; docs/deploy.md)
    runtimes: list[str] = field(default_factory=lambda: ["torch"])
    # where the time goes: torch.profiler's per-layer milliseconds of the evaluated model and of its dense
    # reference at batch 1 (layer_profile.csv, the report's layer_time.png); opt-in, ~10 forward passes more
    profile: bool = False
    progress: bool = True
    # keep freed host memory for reuse (glibc mallopt): CPU forward passes stop page-faulting their
    # activations; the process keeps its peak memory (docs/benchmarks.md). Applied once per process.
    reuse_host_memory: bool = True
    # image resamples for a 95% percentile bootstrap interval of every COCO number, from the one evaluation's
    # per-image matching (logged as <metric>_lo / <metric>_hi); 0: none. An integer >= 0, typed Any so that a
    # bad value gets resolve's message (key, value, what is allowed) rather than Hydra's merge error.
    bootstrap: Any = 0
    # the COCO evaluation in a worker process (spawned once per process), overlapping the job's later stages
    # and, in a sequential sweep, the next point; false: in the job's own process, one stage after the other
    coco_worker: bool = True
    # decoded batches kept in host memory for the process's later points, when the whole set fits this many GiB
    # (coco-val128 at 640: 0.15; COCO val2017 at 640: ~4.7); beyond it they are streamed every pass (from the
    # preprocessed cache) and nothing is held past the batches in flight; 0: never kept
    cache_gb: float = 3.0


@dataclass
class MlflowConfig:
    """Tracking. Empty ``tracking_uri`` -> $MLFLOW_TRACKING_URI, else ``sqlite:///<abs outputs>/mlflow.db``
    (artifacts in ``<abs outputs>/mlartifacts`` unless ``artifact_location`` is set)."""

    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment: str = DEFAULT_EXPERIMENT
    artifact_location: Optional[str] = None
    # seconds a tracking call keeps retrying a store that does not answer (backoff up to 15 s); after that the
    # job keeps evaluating and its record waits in <paths.outputs>/spool/ until the store answers again
    retry_window: float = 300.0


@dataclass
class PathsConfig:
    """Where inputs come from and outputs go.

    ``cache``: weights and datasets (null: ``$SWEEP_CACHE``, else ``$XDG_CACHE_HOME/yolov5-sparsity``,
    else ``~/.cache/yolov5-sparsity``); read, and written only by downloads of missing files.
    ``preprocessed``: the decoded-batch cache (null: ``preprocessed/`` in the per-user cache folder,
    never under ``cache``, which may be a folder of read-only inputs; ``''``: no on-disk cache).
    ``curves``: measured sensitivity curves of ``prune=sensitivity`` (null: ``curves/`` in the per-user
    cache folder, never under ``cache``; ``''``: kept in the process only).
    ``outputs``: runs, the default MLflow store and reports.
    """

    cache: Optional[str] = None
    preprocessed: Optional[str] = None
    curves: Optional[str] = None
    outputs: str = DEFAULT_OUTPUTS


@dataclass
class BudgetConfig:
    """The budget search (``hydra/sweeper=budget``): per combination of the other axes, the highest sparsity
    whose ``metric`` is at least ``keep`` x the dense model's. The search runs over the multiples of ``tol``
    in [0, ``hi``] (so its points are a grid sweep's points, and resume shares them). ``points``: points per
    round and open bracket (null: the launcher's parallel jobs, 1 for the sequential launcher: bisection).
    Read only by the sweeper: no job's config hash or params include it.
    """

    keep: float = 0.95
    metric: str = "mAP50-95"
    tol: float = 0.01
    hi: float = 0.99
    points: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sparsity: Any = 0.0
    resume: bool = True
    report: bool = True


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore and the ``launch_id`` resolver (idempotent). Only the
    top-level schema: it types every group's node, and group-level entries would show up as choices
    (``model=model_schema``)."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    OmegaConf.register_new_resolver("launch_id", launch_id, use_cache=True, replace=True)


def launch_id() -> str:
    """A short id no two launches share, also two started in the same second on one host (``${launch_id:}`` in
    the sweep folder's name). Cached per config like Hydra's ``now``, which Hydra copies into every job's
    config, so the jobs of one sweep (in any launcher's workers) agree on it."""
    return f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
