"""Typed config schema, explicit registration, and job-start validation.

The YAML files under ``conf/`` are the data; these dataclasses are their types.
``register_configs()`` puts the schemas into Hydra's ConfigStore; it is called by
the entry point (and by tests) and never on import.

Every range check lives in ``validate(cfg)`` and raises ``ConfigError`` with one
message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad user input in the config: the message names key, value and what is allowed."""


@dataclass
class ModelConfig:
    """Which pretrained checkpoint to evaluate.

    ``weights`` empty means ``<paths.cache>/weights/<name>.pt`` (downloaded from
    ``url`` when missing). ``name`` is the label used in run names and plots.
    """

    name: str = MISSING
    weights: Optional[str] = None
    url: Optional[str] = None


@dataclass
class DataConfig:
    """A YOLO-format dataset (optionally with an official COCO annotations JSON).

    ``path`` is the dataset root; ``val``/``train`` are image folders (or list
    files) relative to it; labels live where ``/images/`` is replaced by ``/labels/``.
    ``yaml`` points at a YOLOv5 data yaml instead (``path``/``val``/``names`` read
    from it). ``limit`` keeps only the first N images (sorted by file name): for
    tests and smoke runs.
    """

    name: str = MISSING
    path: Optional[str] = None
    yaml: Optional[str] = None
    val: str = "images/val2017"
    train: Optional[str] = None
    annotations: Optional[str] = None
    coco80_to_91: bool = False
    names: Optional[list[str]] = None
    download: Optional[list[dict[str, Any]]] = None
    limit: Optional[int] = None


@dataclass
class PruneConfig:
    """How to prune. ``method`` is a key of ``sweep.prune.methods.PRUNERS``."""

    method: str = "l1_unstructured"
    fused: bool = True
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    round_to: int = 8
    save: bool = False


@dataclass
class RecoverConfig:
    """Accuracy recovery after pruning. ``method`` is a key of ``sweep.recover.methods.RECOVERERS``."""

    method: str = "none"
    data: Optional[str] = None
    images: int = 128
    batch: int = 32
    allow_eval_images: bool = False


@dataclass
class EvalConfig:
    """Evaluation settings, named as in YOLOv5 val.py (the tutorial ran iou=0.65)."""

    imgsz: int = 640
    batch: int = 32
    conf: float = 0.001
    iou: float = 0.65
    max_det: int = 300
    device: str = "auto"
    half: Optional[bool] = None
    backend: str = "faster"
    workers: int = 2
    save_json: bool = False
    latency: bool = True
    latency_iters: int = 10
    progress: bool = True
    reuse_host_memory: bool = True


@dataclass
class MlflowConfig:
    """Tracking. Empty ``tracking_uri`` -> $MLFLOW_TRACKING_URI, else sqlite under outputs/."""

    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment: str = "yolov5-sparsity"
    artifact_location: Optional[str] = None
    retries: int = 3


@dataclass
class PathsConfig:
    """``cache``: weights/datasets; ``preprocessed``: decoded-batch cache (null = none); ``outputs``: runs."""

    cache: str = MISSING
    preprocessed: Optional[str] = None
    outputs: str = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sparsity: Any = 0.0
    resume: bool = True
    report: bool = True


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="prune", name="prune_schema", node=PruneConfig)
    cs.store(group="recover", name="recover_schema", node=RecoverConfig)


def normalize_sparsity(value: Any) -> float:
    """Return ``value`` as a float in [0, 1), rounded to 6 decimals (sweep-range float noise).

    Raises ConfigError for strings, booleans, NaN, negatives and values >= 1.
    """
    allowed = "a number in [0, 1), e.g. 0, 0.3 or 0.5"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"sparsity={value!r} is not a number: allowed is {allowed}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v < 1.0:
        raise ConfigError(f"sparsity={value!r} is out of range: allowed is {allowed}")
    return round(v, 6)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed is {allowed}")


def validate(cfg: DictConfig, stride: int = 32) -> None:
    """Range checks run at job start, before any work. Normalises ``cfg.sparsity`` in place."""
    sparsity = normalize_sparsity(cfg.sparsity)
    OmegaConf.update(cfg, "sparsity", sparsity, force_add=True)
    e = cfg.eval
    _check(e.imgsz >= stride and e.imgsz % stride == 0, "eval.imgsz", e.imgsz,
           f"a positive multiple of the model stride ({stride}), e.g. 320, 640")
    _check(e.batch >= 1, "eval.batch", e.batch, "an integer >= 1")
    for key in ("conf", "iou"):
        v = e[key]
        _check(0.0 <= v <= 1.0 and not math.isnan(v), f"eval.{key}", v, "a number in [0, 1]")
    _check(e.max_det >= 1, "eval.max_det", e.max_det, "an integer >= 1")
    _check(e.workers >= 0, "eval.workers", e.workers, "an integer >= 0")
    _check(e.latency_iters >= 1, "eval.latency_iters", e.latency_iters, "an integer >= 1")
    dev = str(e.device)
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           "eval.device", dev, "auto, cpu, cuda or cuda:N")
    if cfg.data.limit is not None:
        _check(cfg.data.limit >= 1, "data.limit", cfg.data.limit, "an integer >= 1 or null")
    _check(cfg.prune.round_to >= 1, "prune.round_to", cfg.prune.round_to, "an integer >= 1")
    r = cfg.recover
    _check(r.images >= 1, "recover.images", r.images, "an integer >= 1")
    _check(r.batch >= 1, "recover.batch", r.batch, "an integer >= 1")
