"""Resolve once: the composed Hydra config -> a frozen :class:`JobSpec`, before any MLflow run exists.

Every check of the user's input lives here and raises one error whose message names the key, the
value and what is allowed (``ConfigError``; ``AssetError``/``DataError``/``CheckpointError`` for
files). The pre-flight also opens the checkpoint, scans the dataset's labels and checks the
calibration images (through the process memo, so the job does not repeat it), so input errors never
leave a FAILED run behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sweep import assets, contract
from sweep.config.hyp import HYP_SCRATCH_LOW
from sweep.config.schema import ConfigError
from sweep.config.spec import (BudgetSpec, DataSpec, EvalSpec, JobSpec, ModelSpec, PruneSpec, RecoverSpec, Source,
                               TrackSpec)
from sweep.data import DataError, load_data_yaml
from sweep.evaluate.coco import EVALUATORS
from sweep.evaluate.device import resolve_device
from sweep.model import is_fused, load_checkpoint
from sweep.prune import PRUNERS, select_convs
from sweep.recover import RECOVERERS
from sweep.recover.calibration import ALLOWED_SOURCES

DEFAULT_IMGSZ = 640
DATASET_CONFIG_SUFFIXES = (".yaml", ".yml")
DATA_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "data"  # the `data=` options, by name
# The recover settings that change each method's result (the rest of recover.* is left out of its hash).
RECOVER_KEYS = {"bn": ("method", "data", "images", "batch", "allow_eval_images")}
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed is {allowed}")


def normalize_sparsity(value: Any) -> float:
    """``value`` as a float in [0, 1), rounded to 6 decimals (sweep-range float noise).

    Raises ConfigError for strings, booleans, NaN, negatives and values that are 1 or round to 1.
    """
    allowed = "a number in [0, 1), e.g. 0, 0.3 or 0.5"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"sparsity={value!r} is not a number: allowed is {allowed}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= round(v, 6) < 1.0:
        raise ConfigError(f"sparsity={value!r} is out of range: allowed is {allowed} (at most 0.999999)")
    return round(v, 6)


# ------------------------------------------------------------------------------- plain values


def _container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data; a mandatory value left unset (``???``) is a ConfigError naming it."""
    if "hydra" in cfg:  # Hydra's own node has run-time interpolations (hydra.job.num) that need not resolve here
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "") or "?"
        hint = " (e.g. model.weights=/path/to/best.pt)" if key == "model.weights" else ""
        raise ConfigError(f"{key} is not set: allowed is a value for it{hint}") from None
    assert isinstance(c, dict)
    c.pop("hydra", None)
    return c


def _check_values(c: Mapping[str, Any]) -> None:
    e = c["eval"]
    if e["imgsz"] is not None:
        _check(isinstance(e["imgsz"], int) and e["imgsz"] >= 32 and e["imgsz"] % 32 == 0, "eval.imgsz", e["imgsz"],
               "a positive multiple of the model stride (32), e.g. 320, 640")
    _check(e["batch"] >= 1, "eval.batch", e["batch"], "an integer >= 1")
    for key in ("conf", "iou"):
        v = e[key]
        _check(0.0 <= v <= 1.0 and not math.isnan(v), f"eval.{key}", v, "a number in [0, 1]")
    _check(e["max_det"] >= 1, "eval.max_det", e["max_det"], "an integer >= 1")
    _check(e["workers"] is None or e["workers"] >= 0, "eval.workers", e["workers"], "an integer >= 0 or null")
    _check(isinstance(e["cache_gb"], (int, float)) and e["cache_gb"] >= 0 and not math.isnan(e["cache_gb"]),
           "eval.cache_gb", e["cache_gb"], "a number of GiB >= 0 (0: never keep decoded batches in memory)")
    _check(e["latency_iters"] >= 1, "eval.latency_iters", e["latency_iters"], "an integer >= 1")
    b = e["bootstrap"]
    _check(isinstance(b, int) and not isinstance(b, bool) and b >= 0, "eval.bootstrap", b,
           "an integer >= 0 (image resamples for the 95% confidence intervals; 0: none), e.g. 1000")
    runtimes = list(e["runtimes"] or [])
    _check(bool(runtimes) and len(set(runtimes)) == len(runtimes) and all(r in contract.RUNTIMES for r in runtimes),
           "eval.runtimes", runtimes, f"a non-empty list without repeats of {', '.join(contract.RUNTIMES)}, "
           "e.g. [torch,onnxruntime]")
    if "onnxruntime" in runtimes and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(f"eval.runtimes={runtimes} includes onnxruntime, but the onnxruntime package is not "
                          "installed: install it (pip install onnxruntime onnx) or allowed is eval.runtimes=[torch]")
    dev = str(e["device"])
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           "eval.device", dev, "auto, cpu, cuda or cuda:N")
    if c["data"]["limit"] is not None:
        _check(c["data"]["limit"] >= 1, "data.limit", c["data"]["limit"], "an integer >= 1 or null")
    _check(c["prune"]["round_to"] >= 1, "prune.round_to", c["prune"]["round_to"], "an integer >= 1")
    _check_levels(c["prune"]["levels"])
    _check(c["prune"]["images"] >= 1, "prune.images", c["prune"]["images"], "an integer >= 1")
    _check(c["prune"]["batch"] >= 1, "prune.batch", c["prune"]["batch"], "an integer >= 1")
    r = c["recover"]
    _check(r["images"] >= 1, "recover.images", r["images"], "an integer >= 1")
    _check(r["batch"] >= 1, "recover.batch", r["batch"], "an integer >= 1")
    _check(c["mlflow"]["retry_window"] >= 0, "mlflow.retry_window", c["mlflow"]["retry_window"],
           "a number of seconds >= 0")
    _check(r["epochs"] >= 1, "recover.epochs", r["epochs"], "an integer >= 1")
    if r["iters"] is not None:
        _check(r["iters"] >= 1, "recover.iters", r["iters"], "an integer >= 1 or null (no cap)")
    if r["data_limit"] is not None:
        _check(r["data_limit"] >= 1, "recover.data_limit", r["data_limit"], "an integer >= 1 or null")
    unknown = sorted(set(r["hyp"]) - set(HYP_SCRATCH_LOW))
    if unknown:
        raise ConfigError(f"recover.hyp.{unknown[0]}={r['hyp'][unknown[0]]!r} is unknown: allowed are YOLOv5's "
                          f"hyp.scratch-low keys: {', '.join(HYP_SCRATCH_LOW)}")
    for key, value in r["hyp"].items():
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
               f"recover.hyp.{key}", value, "a finite number")
    for key, value, registry in (("prune.method", c["prune"]["method"], PRUNERS),
                                 ("recover.method", r["method"], RECOVERERS),
                                 ("eval.backend", e["backend"], EVALUATORS)):
        if value not in registry:
            raise ConfigError(f"{key}={value!r} is unknown: allowed are {', '.join(sorted(registry))}")
    if r["method"] != "none" and c["prune"]["fused"]:
        raise ConfigError(f"recover.method={r['method']!r} needs prune.fused=false (recovery works on the "
                          "unfused model's BatchNorm layers, before fusion); prune.fused=true is not allowed with it")


def _check_levels(levels: Any) -> None:
    allowed = "a non-empty list of distinct numbers in (0, 1), e.g. [0.1,0.3,0.5,0.7,0.9]"
    ok = isinstance(levels, (list, tuple)) and len(levels) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < 1.0 for v in levels) \
        and len(set(levels)) == len(levels)
    _check(ok, "prune.levels", levels, allowed)


def _check_sparsity_levels(c: Mapping[str, Any], sparsity: float) -> None:
    """``prune=sensitivity`` allocates each layer at most the largest measured level."""
    p = c["prune"]
    if p["method"] == "sensitivity" and sparsity > max(p["levels"]):
        raise ConfigError(f"sparsity={sparsity!r} is above the largest prune.levels value {max(p['levels'])}: "
                          "prune=sensitivity allocates each layer at most that sparsity; allowed is a sparsity up "
                          "to it, or a larger level in prune.levels (e.g. prune.levels=[0.1,0.3,0.5,0.7,0.9,0.95])")


# ------------------------------------------------------------------------------- paths


def _outputs(c: Mapping[str, Any]) -> Path:
    out = Path(str(c["paths"]["outputs"])).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"paths.outputs={str(out)!r} is a file: allowed is a folder (existing or to be created)")
    return out


def _cache_folder(value: str | None, name: str) -> Path | None:
    """A ``paths.*`` cache setting: null -> the per-user cache folder's ``<name>/``; '' -> none (no disk cache)."""
    if value is None:
        return assets.default_cache_dir() / name
    return Path(value).expanduser() if str(value).strip() else None


def preprocessed_dir(value: str | None) -> Path | None:
    """``paths.preprocessed``: null -> the per-user cache folder's ``preprocessed/``; '' -> no disk cache."""
    return _cache_folder(value, "preprocessed")


def curves_dir(value: str | None) -> Path | None:
    """``paths.curves``: null -> the per-user cache folder's ``curves/``; '' -> kept in the process only."""
    return _cache_folder(value, "curves")


def _model(c: Mapping[str, Any], cache: Path, memo: Any) -> ModelSpec:
    m = c["model"]
    if not m.get("weights") and m["name"] == "custom":
        raise ConfigError("model.weights is not set: model=custom needs model.weights=/path/to/best.pt")
    weights = assets.resolve_weights(str(m["name"]), cache, m.get("weights"), m.get("url"),
                                     verify=load_checkpoint)
    return ModelSpec(str(m["name"]), weights, memo.sha256(weights))


def _join(root: Path, spec: Any) -> Source:
    """Absolute image source(s): relative entries are relative to ``root``; an absolute one stays."""
    if isinstance(spec, (list, tuple)):
        return tuple(str(root / Path(str(s)).expanduser()) for s in spec)
    return str(root / Path(str(spec)).expanduser())


def _exists_all(source: Source) -> list[str]:
    return [p for p in ((source,) if isinstance(source, str) else source) if not Path(p).exists()]


def resolve_data(c: Mapping[str, Any], cache: Path) -> DataSpec:
    """``c['data']`` (plain config data) -> paths on disk; a configured dataset missing from the cache is downloaded."""
    d = c["data"]
    if d.get("yaml"):
        try:
            y = load_data_yaml(Path(str(d["yaml"])).expanduser())
        except DataError as e:
            raise DataError(f"data.yaml={str(d['yaml'])!r}: {e}") from None
        if not y.get("val"):
            raise DataError(f"data.yaml={str(d['yaml'])!r} has no 'val' split: allowed is a YOLOv5 data yaml "
                            "with path, val and names")
        spec = DataSpec(str(d["name"]), Path(y["path"]), _as_source(y["val"]),
                        _as_source(y["train"]) if y.get("train") else None, None, False,
                        tuple(y["names"]), d.get("limit"))
    else:
        root = Path(str(d["path"])).expanduser() if d.get("path") else assets.dataset_path(cache, str(d["name"]))
        if not root.is_dir() and d.get("download"):
            if root.resolve() != assets.dataset_path(cache, str(d["name"])).resolve():
                raise DataError(f"data.path={str(root)!r}: missing, and a download goes only into the cache "
                                f"({assets.dataset_path(cache, str(d['name']))})")
            assets.ensure_dataset(str(d["name"]), cache, d["download"])
        if not root.is_dir():
            raise DataError(f"data.path={str(root)!r}: the dataset folder does not exist; allowed is an existing "
                            "folder with images/ and labels/ (set SWEEP_CACHE or paths.cache, or data.path)")
        ann = root / str(d["annotations"]) if d.get("annotations") else None
        if ann is not None and not ann.is_file():
            raise DataError(f"data.annotations={str(d['annotations'])!r}: {ann} does not exist")
        spec = DataSpec(str(d["name"]), root, _join(root, d["val"]),
                        _join(root, d["train"]) if d.get("train") else None, ann, bool(d["coco80_to_91"]),
                        tuple(d["names"]) if d.get("names") else None, d.get("limit"))
    missing = _exists_all(spec.val)
    if missing:
        raise DataError(f"data.val={str(d.get('val') or spec.val)!r}: {missing[0]} does not exist; allowed is an "
                        f"images folder or list file under data.path={str(spec.root)!r}")
    return spec


def _as_source(value: Any) -> Source:
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def resolve_recover(c: Mapping[str, Any], data: DataSpec) -> RecoverSpec:
    """``c['recover']`` with its calibration source: ``recover.data`` (an image folder, a ``.txt`` list, or a
    YOLOv5 data yaml's ``train`` split; relative to the working directory), else the dataset's train split."""
    r = c["recover"]
    source, key = None, ""
    if r["method"] != "none":
        source, key = _calibration_source(r, c["data"], data, assets.cache_root(c["paths"]["cache"]),
                                          f"recover.method={r['method']!r}")
    return RecoverSpec(str(r["method"]), source, key, int(r["images"]), int(r["batch"]), bool(r["allow_eval_images"]),
                       int(r["epochs"]), r["iters"], bool(r["augment"]), bool(r["recalibrate"]),
                       tuple(sorted((k, float(v)) for k, v in r["hyp"].items())), r["data_limit"], int(r["seed"]))


def _named_train_split(name: str, config: Path, cache: Path) -> Source:
    """The ``train`` split of one of the data configs under ``conf/data`` (``recover.data=coco128``)."""
    d = OmegaConf.to_container(OmegaConf.load(config))
    assert isinstance(d, dict)
    if not d.get("train"):
        raise ConfigError(f"recover.data={name!r}: that data config has no train split; allowed is "
                          f"{ALLOWED_SOURCES}")
    root = Path(str(d["path"])).expanduser() if d.get("path") else assets.dataset_path(cache, str(d.get("name", name)))
    return _join(root, d["train"])


def _calibration_source(r: Mapping[str, Any], data_cfg: Mapping[str, Any], data: DataSpec,
                        cache: Path, who: str) -> tuple[Source, str]:
    """Where calibration images come from (``recover.data``, else the dataset's train split) for ``who`` (the
    setting that needs them, named in the error when there is none)."""
    if r.get("data"):
        p = Path(str(r["data"])).expanduser()
        named = DATA_CONFIGS / f"{r['data']}.yaml"
        if not p.exists() and p.name == str(r["data"]) and named.is_file():  # a data config's name, e.g. coco128
            return _named_train_split(str(r["data"]), named, cache), "recover.data"
        if p.suffix.lower() in DATASET_CONFIG_SUFFIXES:
            try:
                y = load_data_yaml(p)
            except DataError as e:
                raise ConfigError(f"recover.data={str(r['data'])!r}: {e}; allowed is {ALLOWED_SOURCES}") from None
            if not y.get("train"):
                raise ConfigError(f"recover.data={str(r['data'])!r}: the dataset yaml has no 'train' split; "
                                  f"allowed is {ALLOWED_SOURCES}")
            return _as_source(y["train"]), "recover.data"
        return str(p), "recover.data"
    if data.train is not None:
        in_cache = data.root.resolve() == assets.dataset_path(cache, str(data_cfg["name"])).resolve()
        if data_cfg.get("train_download") and in_cache and isinstance(data.train, str) and not Path(data.train).exists():
            split = Path(data.train).relative_to(data.root).as_posix()  # COCO's train2017: fetched on first need
            assets.ensure_split(str(data_cfg["name"]), cache, split, data_cfg["train_download"])
        return data.train, "data.yaml train" if data_cfg.get("yaml") else "data.train"
    raise ConfigError(f"{who} needs calibration images, but recover.data is empty "
                      f"and data {data.name!r} has no train split: set recover.data to {ALLOWED_SOURCES}")


def resolve_prune(c: Mapping[str, Any], data: DataSpec) -> PruneSpec:
    """``c['prune']``; ``sensitivity`` also gets its calibration images, from the source ``recover=bn`` would use
    (``recover.data``, else the dataset's train split), whatever ``recover.method`` is."""
    p, r = c["prune"], c["recover"]
    source, key = (None, "")
    if p["method"] == "sensitivity":
        source, key = _calibration_source(r, c["data"], data, assets.cache_root(c["paths"]["cache"]),
                                          "prune.method='sensitivity'")
    return PruneSpec(str(p["method"]), bool(p["fused"]), tuple(p["include"] or ()), tuple(p["exclude"] or ()),
                     int(p["seed"]), int(p["round_to"]), bool(p["save"]), tuple(float(v) for v in p["levels"]),
                     int(p["images"]), int(p["batch"]), source, key, bool(r["allow_eval_images"]),
                     curves_dir(c["paths"].get("curves")))


def resolve_tracking(cfg: DictConfig | Mapping[str, Any]) -> TrackSpec:
    """The tracking store of ``cfg.mlflow``: URI > $MLFLOW_TRACKING_URI > the default sqlite store under outputs."""
    c = cfg if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig) else _container(cfg)  # type: ignore[arg-type]
    m = c["mlflow"]
    outputs = _outputs(c)
    uri = contract.tracking_uri(m.get("tracking_uri"), outputs)
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme and len(scheme) > 1 and scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"mlflow.tracking_uri={contract.redact(uri)!r} is invalid: allowed are "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} URIs or a local folder")
    artifacts = m.get("artifact_location")
    if not artifacts and uri == contract.default_store(outputs)[0]:
        artifacts = contract.default_store(outputs)[1]
    return TrackSpec(bool(m["enabled"]), uri, str(m["experiment"]), artifacts, float(m["retry_window"]),
                     outputs.resolve() / contract.SPOOL_DIR)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_budget(cfg: DictConfig | Mapping[str, Any]) -> BudgetSpec:
    """``budget.*`` checked: ``keep`` in (0, 1], ``metric`` a COCO number, ``hi`` a sparsity in (0, 1),
    ``tol`` in (0, ``hi``) (else there is no point to search), ``points`` null or >= 1."""
    c = cfg if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig) else _container(cfg)  # type: ignore[arg-type]
    b = c["budget"]
    _check(_number(b["keep"]) and 0.0 < b["keep"] <= 1.0, "budget.keep", b["keep"],
           "a fraction of the dense metric in (0, 1], e.g. 0.95")
    if b["metric"] not in contract.BUDGET_METRICS:
        raise ConfigError(f"budget.metric={b['metric']!r} is unknown: allowed are {', '.join(contract.BUDGET_METRICS)}")
    _check(_number(b["hi"]) and 0.0 < round(b["hi"], 6) < 1.0, "budget.hi", b["hi"],
           "the highest sparsity to search, in (0, 1), e.g. 0.99")
    _check(_number(b["tol"]) and 0.0 < b["tol"] < b["hi"], "budget.tol", b["tol"],
           f"a step in (0, budget.hi={b['hi']}), e.g. 0.01 (the search's resolution)")
    if b["points"] is not None:
        _check(isinstance(b["points"], int) and b["points"] >= 1, "budget.points", b["points"],
               "an integer >= 1 (points per round and bracket) or null (the launcher's parallel jobs)")
    return BudgetSpec(float(b["keep"]), str(b["metric"]), float(b["tol"]), round(float(b["hi"]), 6), b["points"])


# ------------------------------------------------------------------------------- the job


def _probe_write(folder: Path) -> None:
    """Create ``folder`` and write a file in it (permission bits do not stop root; a read-only mount does)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def check_writable(cfg: DictConfig) -> None:
    """Refuse, with one message naming the folder or store, outputs the process cannot write: checked by
    writing (a probe file, an SQLite write transaction rolled back), since permission bits do not stop
    root and say nothing of read-only file systems."""
    c = _container(cfg)
    out = _outputs(c)
    try:
        _probe_write(out)
    except OSError as exc:
        raise ConfigError(f"paths.outputs={str(out)!r} is not writable ({exc.strerror or exc}): allowed is a folder "
                          "this user can create and write; set paths.outputs=DIR") from None
    uri = resolve_tracking(c).uri
    db = contract.sqlite_file(uri) if c["mlflow"]["enabled"] else None
    if db is None:
        return
    try:
        _probe_write(db.parent)  # the store's lock and journal files live beside it
        if db.exists():
            conn = sqlite3.connect(db, timeout=30)
            try:  # a real write, rolled back: opening and BEGIN succeed on a read-only file system
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"PRAGMA user_version = {int(version)}")
                conn.rollback()
            finally:
                conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"mlflow.tracking_uri={contract.redact(uri)!r}: the SQLite store is not writable "
                          f"({exc}): allowed is a store this user can write; make {db} (and its folder) "
                          "writable or set mlflow.tracking_uri") from None


def semantic_config(c: Mapping[str, Any], weights_sha256: str, device: torch.device, half: bool,
                    sparsity: float) -> dict[str, Any]:
    """The settings that determine a job's numbers (hashed into ``config_hash``).

    At sparsity 0 (and no recovery) every pruning method is the same dense model, so the pruning
    options are left out: a dense point is evaluated once per model and data. ``eval.bootstrap`` is left
    out too: it adds confidence intervals, never changes the numbers, so a run with or without them is the
    same point (one curve, one table row); resume instead re-runs a finished run that lacks the interval
    asked for (``contract.has_interval``, sweep/job.py), and a plain rerun reuses a run that has one.
    """
    # the curve settings decide only sensitivity's result (left out for the other methods, so the hashes of
    # their earlier runs stay the same); prune.batch changes no number, the calibration source does
    curve_keys = ("levels", "images")
    prune = {k: v for k, v in c["prune"].items() if k not in ("save", "batch") + curve_keys}
    if prune["method"] == "sensitivity":
        prune |= {k: c["prune"][k] for k in curve_keys} | {"calibration": c["recover"].get("data")}
    dense = sparsity == 0.0 and c["recover"]["method"] == "none"
    r = c["recover"]
    keys = RECOVER_KEYS.get(r["method"], tuple(r)) if r["method"] != "none" else ("method",)
    recover = {k: r[k] for k in keys}
    e = c["eval"]
    data = {k: c["data"].get(k) for k in ("name", "val", "annotations", "limit", "coco80_to_91")}
    if c["data"].get("yaml"):
        data["yaml"] = str(Path(c["data"]["yaml"]).resolve())
    return {
        "weights_sha256": weights_sha256,
        "data": data,
        "prune": None if dense else prune,
        "recover": recover,
        "sparsity": sparsity,
        "eval": {k: e[k] for k in ("imgsz", "batch", "conf", "iou", "max_det")} | {"device": device.type, "half": half}
        # the runtimes decide which figures a run has: asking for ONNX Runtime re-runs a point evaluated without
        # it (left out at the default, so the hashes of earlier runs stay the same)
        | ({"runtimes": list(e["runtimes"])} if list(e["runtimes"]) != ["torch"] else {})
        | ({"profile": True} if e.get("profile") else {}),  # the same rule: a profile asked for is measured
    }


def config_hash(semantic: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of the settings that determine a job's numbers."""
    return hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _inputs(c: Mapping[str, Any], cache: Path, memo: Any) -> tuple[ModelSpec, DataSpec]:
    """The weights and the dataset, both tried: when files are missing (offline), one message lists every one."""
    if not c["model"].get("weights") and c["model"]["name"] == "custom":  # a config mistake, not a missing file
        raise ConfigError("model.weights is not set: model=custom needs model.weights=/path/to/best.pt")
    found: list[Any] = []
    missing: list[Exception] = []
    for find in (lambda: _model(c, cache, memo), lambda: resolve_data(c, cache)):
        try:
            found.append(find())
        except (assets.AssetError, ConfigError, DataError) as e:  # both tried: the user fixes both at once
            missing.append(e)
    if len(missing) > 1:
        raise assets.AssetError("missing input files: " + " | ".join(f"({i}) {m}" for i, m in enumerate(missing, 1)))
    if missing:
        raise missing[0]
    return found[0], found[1]


def check_inputs(cfg: DictConfig, memo: Any) -> None:
    """The input files of a job exist (or are downloaded now): its weights and dataset, every missing one
    named in one message. A sweep runs this once per distinct (model, data, cache) before its parent run."""
    c = _container(cfg)
    _inputs(c, assets.cache_root(c["paths"]["cache"]), memo)


def inputs_key(cfg: DictConfig) -> str:
    """What :func:`check_inputs` depends on: jobs with the same key share one check."""
    c = _container(cfg)
    return json.dumps([c["model"], c["data"], c["paths"]["cache"]], sort_keys=True, default=str)


def check_values(cfg: DictConfig) -> None:
    """The checks that need no file: every value and combination (what the sweep callback runs on every job's
    config before the sweep's parent run exists)."""
    c = _container(cfg)
    _check_values(c)
    _check_sparsity_levels(c, normalize_sparsity(c["sparsity"]))
    _outputs(c)
    resolve_tracking(c)


def decode_threads(workers: int | None) -> int:
    """``eval.workers``, or (null) the CPUs this process may use (its affinity: what Slurm's cpus_per_task
    gives it), at most 8: decoding stops scaling there and the rest stay with the forward pass."""
    if workers is not None:
        return int(workers)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus))


def resolve_job(cfg: DictConfig, memo: Any) -> JobSpec:
    """The whole pre-flight of one job. ``memo`` (:class:`sweep.memo.ProcessMemo`) keeps what it opens
    (checkpoint, dataset scan, calibration images) for the job and for later jobs of the process."""
    c = _container(cfg)
    c.pop("budget", None)  # the budget sweeper's settings, no job's: not in its params or config.yaml
    _check_values(c)
    sparsity = normalize_sparsity(c["sparsity"])
    _check_sparsity_levels(c, sparsity)
    _outputs(c)  # a file where the outputs folder should be is refused before any work
    track = resolve_tracking(c)
    wanted = str(c["eval"]["device"])
    claim = memo.gpu_claim() if wanted in ("auto", "cuda") and torch.cuda.is_available() else None
    device, half = resolve_device(wanted, c["eval"]["half"], claim)
    cache = assets.cache_root(c["paths"]["cache"])
    model, data = _inputs(c, cache, memo)
    ckpt = memo.checkpoint(model.weights, model.sha256)
    imgsz = c["eval"]["imgsz"] or c["model"].get("imgsz") or DEFAULT_IMGSZ
    stride = int(ckpt.stride.max())
    _check(imgsz % stride == 0 and imgsz >= stride, "eval.imgsz", imgsz,
           f"a positive multiple of the model stride ({stride}), e.g. {stride * 10}, {stride * 20}")
    if data.names is not None and len(data.names) != len(ckpt.names):
        raise ConfigError(f"model.weights={str(model.weights)!r} has {len(ckpt.names)} classes but data "
                          f"{data.name!r} names {len(data.names)}: allowed is a checkpoint trained on this dataset's "
                          "classes")
    prune = resolve_prune(c, data)
    select_convs(ckpt.model, prune.include, prune.exclude)  # a pattern that matches nothing is refused now
    recover = resolve_recover(c, data)
    if recover.method != "none" and is_fused(ckpt.model):
        raise ConfigError(f"recover.method={recover.method!r} needs BatchNorm layers, but model.weights="
                          f"{str(model.weights)!r} was saved already fused (no BatchNorm left): allowed is an unfused "
                          "checkpoint (e.g. the official release or train.py's best.pt), or recover=none")
    e = c["eval"]
    evaluation = EvalSpec(int(imgsz), int(e["batch"]), float(e["conf"]), float(e["iou"]), int(e["max_det"]),
                          str(device), half, str(e["backend"]), decode_threads(e["workers"]), bool(e["save_json"]),
                          bool(e["latency"]), int(e["latency_iters"]), bool(e["progress"]),
                          preprocessed_dir(c["paths"]["preprocessed"]), tuple(e["runtimes"]), int(e["bootstrap"]),
                          bool(e["profile"]), bool(e["coco_worker"]), int(float(e["cache_gb"]) * 1024**3),
                          bool(claim is not None and claim.shared))
    eval_data = memo.eval_data(data, evaluation, stride, ckpt.names, model.weights)  # scans every label now
    memo.calibration(recover, evaluation, eval_data.files, device, ckpt.names)  # refuses evaluation images now
    memo.calibration(prune.calibration, evaluation, eval_data.files, device, ckpt.names)  # sensitivity's images

    c["sparsity"] = sparsity
    c["eval"] |= {"imgsz": evaluation.imgsz, "device": str(device), "half": half}
    c["model"] |= {"weights": str(model.weights), "sha256": model.sha256}
    c["paths"] |= {"cache": str(cache), "preprocessed": str(evaluation.preprocessed or ""),
                   "curves": str(prune.curves or "")}
    c["mlflow"] |= {"tracking_uri": contract.redact(track.uri)}  # params, config.yaml: never a password
    chash = config_hash(semantic_config(c, model.sha256, device, half, sparsity))
    name = contract.run_name(model.name, prune.method, prune.fused, recover.method, sparsity)
    return JobSpec(model, data, prune, recover, evaluation, track, sparsity, bool(c["resume"]), name, chash,
                   flatten(c), OmegaConf.to_yaml(OmegaConf.create(c)))
