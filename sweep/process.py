"""Process setup, done once by the entry point (never inside a job): host-memory policy and MLflow's HTTP client.

``setup_process`` applies both. Host memory: keep freed memory in the process for reuse instead of
handing it back to the OS.

A CPU forward pass at batch 32 allocates activations of tens to hundreds of MB per layer.
glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and unmaps it on ``free``, so every pass page-faults all of its activations again:
with as much kernel time in page faults as in compute (docs/benchmarks.md). Serving large blocks
from the heap and never trimming it makes later passes reuse the same pages; the price is that the
process keeps its peak host memory plus some fragmentation.

Only glibc (Linux) has these knobs; elsewhere this does nothing. ``eval.reuse_host_memory``
switches it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h) and glibc's defaults for them
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536


def keep_freed_memory(enabled: bool = True) -> bool:
    """``enabled``: serve large blocks from the heap and never trim it; else glibc's defaults
    (``mallopt``). True when applied.

    Safe to call again. Affects allocations made after the call; blocks that are mapped
    already are unmapped as before when freed.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mmap_max, trim = (0, -1) if enabled else (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)  # -1: never trim
        ok = libc.mallopt(M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable (%s): host memory is returned to the OS as usual", exc)
        return False
    return bool(ok)


def bound_mlflow_http_retries() -> None:
    """MLflow's HTTP client retries a refused connection for minutes on its own (7 retries, exponential
    backoff): with the tracker's own bounded retries on top, a dropped server would stall a job for a
    quarter of an hour. The tracker is the one retry layer, unless the user set these variables."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    # MLflow 3 writes "View run <name> at: <tracking URI>/..." straight to stdout for every run it ends: the
    # URI unredacted (user:password), one line per job; the sweep logs its own (redacted) store line
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def redact_log_records() -> None:
    """Every log record of the process — ours, Hydra's (it prints each job's overrides, tracking URI
    included), MLflow's — has passwords and secret query values masked before any handler sees it. A
    record factory, not a handler filter: Hydra replaces the handlers for every job. Idempotent."""
    from sweep.contract import redact

    current = logging.getLogRecordFactory()
    if getattr(current, "redacts", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is the logging module's to report
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


TRACKING_URI_KEY = "mlflow.tracking_uri"


def credentials_to_environment(argv: list[str]) -> list[str]:
    """``argv`` with the user:password of an http(s) ``mlflow.tracking_uri=`` override (and of
    $MLFLOW_TRACKING_URI) moved into $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, which MLflow
    sends as the same basic-auth header. Hydra then never sees the password, so it is in none of the
    files Hydra writes (``.hydra/*.yaml``, ``multirun.yaml``) or the overrides it logs. Other schemes
    (database URIs) keep theirs: every value the tool itself writes or logs is redacted anyway."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == TRACKING_URI_KEY:
            arg = f"{key}={_strip_credentials(value)}"
        out.append(arg)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = _strip_credentials(os.environ["MLFLOW_TRACKING_URI"])
    return out


def _strip_credentials(uri: str) -> str:
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None or "," in uri:  # "," : a sweep over URIs
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host))


def setup_process(reuse_host_memory: bool | None = True) -> None:
    """Everything process-wide, once, at the entry point (idempotent). ``reuse_host_memory=None`` leaves the
    allocator alone (the entry point calls this before the config, which decides it, is composed)."""
    if reuse_host_memory is not None:
        keep_freed_memory(reuse_host_memory)
    bound_mlflow_http_retries()
    redact_log_records()
