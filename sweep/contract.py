"""The names the job, tracking, the sweep callback and the report share — defined once, here.

Pure Python (no torch, no MLflow): metric names, MLflow tag keys, the run-name format and its
parser, the ``outcome.json`` record, and the default experiment and tracking store. A metric or
tag that crosses a module boundary is spelled only in this file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

# ------------------------------------------------------------------------------- metrics

COCO_METRICS = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
                "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
# eval.bootstrap=N: a 95% percentile bootstrap interval of each COCO number (N image resamples of the one
# evaluation's per-image matching), logged as <metric>_lo / <metric>_hi, and N itself
INTERVAL_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = "bootstrap_resamples"


def interval_metrics(metric: str) -> tuple[str, str]:
    """The lower and upper confidence-interval metrics of a COCO metric: ``mAP50-95_lo``, ``mAP50-95_hi``."""
    return f"{metric}_lo", f"{metric}_hi"


def has_interval(metrics: dict[str, float], resamples: int) -> bool:
    """Whether a finished run's metrics satisfy ``eval.bootstrap=resamples``: nothing asked, or an interval
    from at least that many resamples (resume re-runs a point whose run lacks the interval asked for)."""
    return resamples <= 0 or float(metrics.get(BOOTSTRAP_RESAMPLES, 0)) >= resamples


SPEED_METRICS = ("ms_preprocess", "ms_inference", "ms_nms")  # per image, as val.py prints them
COUNT_METRICS = ("images", "instances")
COST_METRICS = ("sparsity_target", "sparsity", "sparsity_global", "params", "params_nonzero",
                "gflops", "size_mb", "size_mb_compressed")
LATENCY_B1 = "latency_b1_ms"
_LATENCY_BATCH = re.compile(r"^latency_b(?P<batch>\d+)_ms_per_image$")


def latency_batch_metric(batch: int) -> str:
    """The per-image latency metric at ``eval.batch`` images per forward pass, e.g. ``latency_b32_ms_per_image``."""
    return f"latency_b{int(batch)}_ms_per_image"


def latency_batch_of(metric: str) -> int | None:
    """The batch size of a :func:`latency_batch_metric` name, else None."""
    m = _LATENCY_BATCH.match(metric)
    return int(m.group("batch")) if m else None


# ONNX Runtime latency (eval.runtimes contains onnxruntime): same inputs and units as the PyTorch ones
LAYER_PROFILE_CSV = "layer_profile.csv"   # eval.profile: per-layer ms of the model and its dense reference
PROFILE_MS_B1 = "profile_ms_b1"            # eval.profile: the summed per-layer ms (marks runs with a profile)
PROFILE_DENSE_MS_B1 = "profile_dense_ms_b1"
ORT_LATENCY_B1 = "ort_latency_b1_ms"
_ORT_LATENCY_BATCH = re.compile(r"^ort_latency_b(?P<batch>\d+)_ms_per_image$")
ORT_LATENCY_DENSE_B1 = "ort_latency_dense_b1_ms"  # the dense model, timed alternately with the pruned one
ORT_SPEEDUP_B1 = "ort_speedup_b1"                # ORT_LATENCY_DENSE_B1 / ORT_LATENCY_B1
ORT_MAX_ABS_DIFF = "ort_max_abs_diff"      # output-match check: max |ONNX Runtime - PyTorch| on its input
ORT_PROVIDER = "ort_provider"              # the execution provider timed (a string in metrics.json)
ONNX_MB = "onnx_mb"                        # the exported .onnx file, 1e6 B
# the prune.save artifact (safetensors + JSON description): stored and zstd-compressed, 1e6 B
ARTIFACT_MB = "artifact_mb"
ARTIFACT_MB_COMPRESSED = "artifact_mb_compressed"
RUNTIMES = ("torch", "onnxruntime")        # allowed values of eval.runtimes


def ort_latency_batch_metric(batch: int) -> str:
    """ONNX Runtime's per-image latency at ``eval.batch``, e.g. ``ort_latency_b32_ms_per_image``."""
    return f"ort_latency_b{int(batch)}_ms_per_image"


def ort_latency_batch_of(metric: str) -> int | None:
    """The batch size of an :func:`ort_latency_batch_metric` name, else None."""
    m = _ORT_LATENCY_BATCH.match(metric)
    return int(m.group("batch")) if m else None


def latency_quartiles(metric: str) -> tuple[str, str]:
    """The first and third quartile metrics of a latency metric: ``latency_b1_ms_q1``, ``latency_b1_ms_q3``."""
    return f"{metric}_q1", f"{metric}_q3"


# The dense model's batch-1 latency, timed alternately with the job's model in the same process, and the
# speed-up that gives (dense median / the model's median: 2.0 = twice as fast, 1.0 = no faster).
LATENCY_DENSE_B1 = "latency_dense_b1_ms"
LATENCY_SPEEDUP_B1 = "latency_speedup_b1"
# Interquartile range / median of the batch-1 latency: above LATENCY_BUSY_SPREAD the machine was busy.
LATENCY_SPREAD_B1 = "latency_b1_spread"
LATENCY_BUSY_SPREAD = 0.10


def metric_order(names: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """Report column order: COCO, speed, counts, cost, latency (batch 1, then every batch size present)."""
    batches = sorted({b for n in names if (b := latency_batch_of(n)) is not None})
    return (COCO_METRICS + SPEED_METRICS + COUNT_METRICS + COST_METRICS + (LATENCY_B1,)
            + tuple(latency_batch_metric(b) for b in batches))


# Fine-tuning's per-step series (``finetune``'s step record key -> metric name), logged as MLflow step metrics.
TRAIN_CURVES = {"loss": "train_loss", "box": "train_box", "obj": "train_obj", "cls": "train_cls", "lr1": "train_lr"}

# Keys of outcome.json's metrics: the end-of-sweep table's, and every COCO number (what a budget search may
# judge a point by, also when the point was skipped by resume and its numbers come from the store).
SUMMARY_METRICS = ("mAP50-95", "mAP50", "AR100", "sparsity", "ms_inference")
OUTCOME_METRICS = tuple(dict.fromkeys(SUMMARY_METRICS + COCO_METRICS))

# ------------------------------------------------------------------------------- tags

TAG_SWEEP_ID = "sweep_id"
TAG_ROLE = "sweep.role"
ROLE_PARENT = "parent"
ROLE_JOB = "job"
TAG_CONFIG_HASH = "config_hash"
TAG_OVERRIDES = "overrides"
TAG_ERROR = "error"
TAG_HOST = "host"
TAG_PID = "pid"
TAG_DEVICE_NAME = "device_name"
TAG_GPU_SHARED = "gpu_shared"  # "true": another process evaluated on the same GPU (its ms figures measure contention)
TAG_OUTPUT_DIR = "output_dir"
TAG_SWEEP_DIR = "sweep_dir"
TAG_SIGNATURE = "sweep.signature"  # parent runs: what the sweep command asked for (continuing an interrupted sweep)
TAG_WAITING_FOR = "waiting_for"  # a job waiting for the run that claimed the same point (concurrent sweeps)
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag
_ALSO_IN_SWEEP = "also_in_sweep."


def continued_tag(sweep_id: str) -> str:
    """Parent-run tag: the launch ``sweep_id`` continued this interrupted sweep (same command, same parent run)."""
    return f"sweep.continued.{sweep_id}"


def sweep_ids(parent_tags: Mapping[str, str]) -> list[str]:
    """Every launch id of one sweep's parent run: its own, then the launches that continued it."""
    prefix = continued_tag("")
    own = [parent_tags[TAG_SWEEP_ID]] if TAG_SWEEP_ID in parent_tags else []
    return own + sorted(k[len(prefix):] for k, v in parent_tags.items() if k.startswith(prefix) and v == "true")


def also_in_sweep_tag(sweep_id: str) -> str:
    """Tag set on a run that a resumed sweep reused instead of re-running (so its report includes it)."""
    return f"{_ALSO_IN_SWEEP}{sweep_id}"


def is_also_in_sweep_tag(key: str) -> bool:
    return key.startswith(_ALSO_IN_SWEEP)


# ------------------------------------------------------------------------------- run names

_RUN_NAME = re.compile(r"^(?P<model>.+?)-(?P<method>[^-]+)(?P<unfused>-unfused(?:-(?P<recover>[^-]+))?)?"
                       r"-s(?P<sparsity>\d+(?:\.\d+)?)$")


def sparsity_label(sparsity: float) -> str:
    """Two decimals when they say it exactly (``0.30``, the names of earlier runs), else every decimal up to
    six (``0.9375``, ``0.96875``: ShrinkBench's 16x and 32x compression), so no two grid points share a label."""
    s = round(float(sparsity), 6)
    short = f"{s:.2f}"
    return short if float(short) == s else f"{s:.6f}".rstrip("0")


def run_name(model: str, method: str, fused: bool, recover: str, sparsity: float) -> str:
    """``<model>-<method>[-unfused[-<recover>]]-s<sparsity>``, e.g. ``yolov5x-l1_unstructured-s0.30``,
    ``yolov5n-random-s0.96875`` (:func:`sparsity_label`).

    A recovery always comes with ``-unfused`` (recovery needs the unfused model), which is what
    makes the name parse back unambiguously.
    """
    name = f"{model}-{method}"
    if not fused:
        name += "-unfused"
        if recover != "none":
            name += f"-{recover}"
    return f"{name}-s{sparsity_label(sparsity)}"


@dataclass(frozen=True)
class RunName:
    model: str
    method: str
    fused: bool
    recover: str
    sparsity: float


def parse_run_name(name: str) -> RunName | None:
    """The fields of a :func:`run_name` (model names may contain dashes), or None when it is not one."""
    m = _RUN_NAME.match(name or "")
    if m is None:
        return None
    return RunName(m.group("model"), m.group("method"), m.group("unfused") is None,
                   m.group("recover") or "none", float(m.group("sparsity")))


# ------------------------------------------------------------------------------- outcome.json

OUTCOME_FILE = "outcome.json"
STATUSES = ("done", "skipped", "failed")


@dataclass
class Outcome:
    """What one job of a sweep came to: written into its output folder, read by the sweep's summary."""

    status: str                    # done | skipped | failed (deferred: in memory only, its completion saves it)
    name: str
    run_id: str | None = None
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    job: str = ""                  # the job's folder name in the sweep dir (filled when read back)
    pending: bool = False          # its run record waits in the spool: the tracking store did not answer

    def save(self, output_dir: Path) -> Path:
        output_dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("job")
        data["metrics"] = {k: v for k, v in self.metrics.items() if k in OUTCOME_METRICS}
        path = output_dir / OUTCOME_FILE
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, output_dir: Path) -> "Outcome":
        """Raises OSError / ValueError when the file is missing or not an outcome."""
        d = json.loads((output_dir / OUTCOME_FILE).read_text())
        if not isinstance(d, dict) or d.get("status") not in STATUSES or not isinstance(d.get("name"), str):
            raise ValueError(f"{output_dir / OUTCOME_FILE} is not an outcome record")
        return cls(d["status"], d["name"], d.get("run_id"), str(d.get("reason") or ""),
                   dict(d.get("metrics") or {}), output_dir.name, bool(d.get("pending", False)))


# ------------------------------------------------------------------------------- budget search

# The budget sweeper (``hydra/sweeper=budget``): the sweep callback recognises it by this target.
BUDGET_SWEEPER = "hydra_plugins.budget_sweeper.budget_sweeper.BudgetSweeper"
BUDGET_METRICS = COCO_METRICS      # allowed values of budget.metric
BUDGET_JSON = "budget.json"        # the answer, in the sweep dir and on the parent run
BUDGET_CSV = "budget.csv"
BUDGET_TAG_PREFIX = "budget."      # parent-run tags: budget.keep, budget.metric, budget.tol, budget.hi
# Per combination on the parent run (label: the run name without its sparsity, e.g. yolov5n-global_l1):
# metrics budget.max_sparsity/<label>, budget.retention/<label>, budget.value/<label> (the metric at
# max sparsity), budget.points/<label>; tags budget.status/<label>, budget.bracket/<label>.
BUDGET_MAX_SPARSITY = "budget.max_sparsity"
BUDGET_RETENTION = "budget.retention"
BUDGET_VALUE = "budget.value"
BUDGET_POINTS = "budget.points"
BUDGET_STATUS = "budget.status"
BUDGET_BRACKET = "budget.bracket"


def budget_key(what: str, label: str) -> str:
    """A per-combination parent-run key, e.g. ``budget.max_sparsity/yolov5n-global_l1``."""
    return f"{what}/{label}"


def budget_label(model: str, method: str, fused: bool, recover: str) -> str:
    """A combination's label: its run name without the sparsity (``yolov5n-l1_unstructured-unfused-bn``)."""
    return run_name(model, method, fused, recover, 0.0).rsplit("-s", 1)[0]


# ------------------------------------------------------------------------------- tracking defaults

DEFAULT_EXPERIMENT = "yolov5-sparsity"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"   # MLflow 3's UI: which view an experiment opens on
EXPERIMENT_KIND = "custom_model_development"     # the runs table (model training), not the GenAI overview
DEFAULT_OUTPUTS = "outputs"
SPOOL_DIR = "spool"   # <paths.outputs>/spool/: run records waiting for a tracking store that did not answer


def default_store(outputs: str | os.PathLike = DEFAULT_OUTPUTS) -> tuple[str, str]:
    """(tracking URI, artifact location) of the project's default store under ``outputs``:
    ``sqlite:///<abs outputs>/mlflow.db`` with artifacts in ``<abs outputs>/mlartifacts`` (absolute:
    MLflow's own defaults depend on the working directory)."""
    root = Path(outputs).expanduser().resolve()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None: another kind of store, or in memory)."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def tracking_uri(configured: str | None = None, outputs: str | os.PathLike = DEFAULT_OUTPUTS) -> str:
    """``configured`` > ``$MLFLOW_TRACKING_URI`` > :func:`default_store`'s URI."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store(outputs)[0]


# ------------------------------------------------------------------------------- secrets

# the optional backslashes: Hydra escapes ':' when it prints overrides (http\://user\:password@host)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*\\?://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]*)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:token|access_token|password|secret|key|api_key|sig)=)[^&\s]*",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` and secret query values masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)
