"""MLflow tracking through an explicit ``MlflowClient`` (no fluent global active run).

- Store: the job spec's :class:`sweep.config.spec.TrackSpec` (resolved once: ``mlflow.tracking_uri``
  > $MLFLOW_TRACKING_URI > ``sqlite:///<abs outputs>/mlflow.db``, see ``sweep.contract``).
- One parent run per multirun, one child run per job; tag keys are ``sweep.contract``'s.
- Every client call that fails transiently (SQLite "database is locked" under concurrent writers,
  a tracking server that is restarting or away) is retried with capped exponential backoff for
  ``TrackSpec.retry_window`` seconds, then fails with ``TrackingError``; the job then keeps its
  complete record in the local spool (``sweep.track.spool``) instead of losing it.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import requests
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.assets import file_lock
from sweep.config.spec import TrackSpec
from sweep.contract import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ROLE_PARENT, TAG_CONFIG_HASH, TAG_ERROR, TAG_HOST,
                            TAG_PID, TAG_ROLE, TAG_SIGNATURE, TAG_SWEEP_ID, continued_tag, redact,
                            sqlite_file)

log = logging.getLogger(__name__)
T = TypeVar("T")

PARAM_MAX_LEN = 6000
MAX_BACKOFF = 15.0  # seconds between two attempts at most: a server that is back is noticed soon


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or keeps refusing writes."""


_TRANSIENT_WORDS = ("database is locked", "connection", "timed out", "timeout", "temporarily", "max retries",
                    "remote end closed", "broken pipe", "unavailable")
_TRANSIENT_STATUS = re.compile(r"\b50[234]\b")  # as a word: run ids are hex and may contain "503"


def _is_transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in _TRANSIENT_WORDS) or _TRANSIENT_STATUS.search(text) is not None


class Tracker:
    """A thin, retrying wrapper over ``MlflowClient`` for one experiment."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None,
                 retry_window: float = 300.0, backoff: float = 0.5) -> None:
        self.uri = tracking_uri
        self.experiment = experiment
        self.retry_window = max(0.0, float(retry_window))
        self.backoff = backoff
        self.check_reachable()
        with _store_creation_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.experiment_id = self._call(self._get_or_create_experiment, experiment, artifact_location)

    @classmethod
    def from_spec(cls, spec: TrackSpec, retry_window: float | None = None) -> "Tracker":
        """``retry_window`` overrides the spec's (0: one attempt, e.g. a quick probe or a store known to be down)."""
        return cls(spec.uri, spec.experiment, spec.artifact_location,
                   retry_window=spec.retry_window if retry_window is None else retry_window)

    # -- plumbing ---------------------------------------------------------------------------
    def check_reachable(self, timeout: float = 5.0) -> None:
        """Wait up to the retry window for an HTTP tracking server to answer; then fail with the URI in the message."""
        if not self.uri.startswith(("http://", "https://")):
            return
        url = self.uri.rstrip("/") + "/health"

        def health() -> None:
            try:
                requests.get(url, timeout=timeout).raise_for_status()
            except Exception as exc:  # noqa: BLE001 - any failure means unreachable (retried as a connection error)
                raise ConnectionError(f"{type(exc).__name__}: {exc}") from None

        try:
            self._call(health)
        except TrackingError as exc:
            raise TrackingError(
                f"MLflow tracking server {redact(self.uri)} is unreachable ({exc.__cause__}); start it "
                "(mlflow server ...) or set mlflow.tracking_uri to a reachable store") from None

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args)``, retried on transient failures with backoff (0.5 s doubling, at most 15 s between
        attempts) until ``retry_window`` seconds have passed; then ``TrackingError``."""
        start = time.monotonic()
        for attempt in itertools.count():
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _is_transient(exc):
                    raise
                elapsed = time.monotonic() - start
                delay = min(self.backoff * (2 ** attempt), MAX_BACKOFF, self.retry_window - elapsed)
                if delay <= 0:
                    raise TrackingError(f"MLflow store {redact(self.uri)} did not answer for {elapsed:.0f} s "
                                        f"({attempt + 1} attempts, mlflow.retry_window={self.retry_window:g}): "
                                        f"{redact(str(exc))}") from exc
                log.warning("MLflow call %s failed (%s); retrying in %.1fs", getattr(fn, "__name__", fn),
                            redact(str(exc))[:200], delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _get_or_create_experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            # MLflow 3's UI opens a model-training experiment on its runs table (not the GenAI overview)
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # Another process created it between our lookup and our create: use theirs.
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- queries ----------------------------------------------------------------------------
    def search(self, filter_string: str, max_results: int = 1000) -> list[Any]:
        runs = self._call(self.client.search_runs, [self.experiment_id], filter_string,
                          max_results=max_results, order_by=["attributes.start_time DESC"])
        return list(runs)

    def finished_run(self, config_hash_: str) -> Any | None:
        """The most recent FINISHED run with this config hash, or None."""
        runs = self.search(f"tags.{TAG_CONFIG_HASH} = '{config_hash_}' and attributes.status = 'FINISHED'", 1)
        return runs[0] if runs else None

    def parent_run(self, sweep_id: str) -> Any | None:
        """The parent run of launch ``sweep_id``: its own, or the interrupted sweep's that it continues."""
        runs = self.search(f"tags.{TAG_SWEEP_ID} = '{sweep_id}' and tags.`{TAG_ROLE}` = '{ROLE_PARENT}'", 1)
        runs = runs or self.search(f"tags.`{continued_tag(sweep_id)}` = 'true' and tags.`{TAG_ROLE}` = '{ROLE_PARENT}'", 1)
        return runs[0] if runs else None

    def interrupted_sweep(self, signature: str) -> Any | None:
        """The most recent parent run of the same sweep command, when it did not finish (KILLED by Ctrl-C or
        SIGTERM, FAILED: a job failed, the launcher died, or it was orphaned), else None."""
        runs = self.search(f"tags.`{TAG_SIGNATURE}` = '{signature}' and tags.`{TAG_ROLE}` = '{ROLE_PARENT}'", 1)
        return runs[0] if runs and runs[0].info.status in ("KILLED", "FAILED") else None

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """Make an ended run RUNNING again (a sweep continued by a new launch), with new tags and no error tag."""
        self._call(self.client.update_run, run_id, status="RUNNING")
        if TAG_ERROR in self._call(self.client.get_run, run_id).data.tags:
            self._call(self.client.delete_tag, run_id, TAG_ERROR)
        self.log(run_id, tags=tags)

    def claim(self, config_hash_: str, run_id: str) -> Any | None:
        """Who evaluates the point ``config_hash_``: None when it is this RUNNING run ``run_id``, else the
        run that claimed it first. The claim is the RUNNING run itself: among the RUNNING runs of that
        config hash whose process may be alive, the earliest started (ties: the smaller run id) holds it.
        Every contender creates its run before asking, so two sweeps that reach a point at once agree
        on one holder (start times come from the hosts' clocks: they must agree across hosts)."""
        runs = self.search(f"tags.{TAG_CONFIG_HASH} = '{config_hash_}' and attributes.status = 'RUNNING'")
        live = [r for r in runs if r.info.run_id == run_id or _may_be_alive(r)]
        if not any(r.info.run_id == run_id for r in live):  # not visible yet (a replica that lags): ask again later
            return None
        first = min(live, key=lambda r: (r.info.start_time or 0, r.info.run_id))
        return None if first.info.run_id == run_id else first

    def wait_for(self, run_id: str, poll: float = 2.0, max_poll: float = 10.0) -> Any:
        """Block until run ``run_id`` is no longer RUNNING (or its process on this host is gone); the run."""
        while True:
            run = self._call(self.client.get_run, run_id)
            if run.info.status != "RUNNING" or not _may_be_alive(run):
                return run
            time.sleep(poll)
            poll = min(poll * 1.5, max_poll)

    def delete(self, run_id: str) -> None:
        """Delete a run that never evaluated anything (a lost claim): it must not look like a result."""
        self._call(self.client.delete_run, run_id)

    # -- writes -----------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self._call(self.client.create_run, self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def start_job_run(self, name: str, tags: dict[str, str], sweep_id: str | None) -> str:
        """A job's run, nested under the parent run of its sweep (launch ``sweep_id``) when there is one."""
        parent = self.parent_run(sweep_id) if sweep_id else None
        return self.start_run(name, tags, parent.info.run_id if parent else None)

    def log(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, Any] | None = None) -> None:
        now = int(time.time() * 1000)
        p = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
        m = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if _is_number(v)]
        # a list is a per-step series (e.g. the fine-tuning loss): one value per step, plotted by the MLflow UI
        m += [Metric(k, float(x), now, step) for k, v in (metrics or {}).items() if isinstance(v, (list, tuple))
              for step, x in enumerate(v) if _is_number(x)]
        t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for chunk in _chunks(p, 100):
            self._call(self.client.log_batch, run_id, params=chunk)
        for chunk in _chunks(m, 1000):
            self._call(self.client.log_batch, run_id, metrics=chunk)
        for chunk in _chunks(t, 100):
            self._call(self.client.log_batch, run_id, tags=chunk)

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_file():
                self._call(self.client.log_artifact, run_id, str(path), artifact_path)

    def end(self, run_id: str, status: str) -> None:
        self._call(self.client.set_terminated, run_id, status)

    def fail(self, run_id: str, reason: str) -> None:
        """End a run FAILED with ``reason`` in its ``error`` tag."""
        self.log(run_id, tags={TAG_ERROR: reason})
        self.end(run_id, "FAILED")

    def close_orphans(self, where: str = "", this_process_ended: bool = False) -> list[str]:
        """End FAILED the RUNNING runs (matching the extra filter ``where``) that a process of
        THIS host started and that can no longer be closed by it: the process is gone (killed,
        out of memory, or it gave up on an unreachable tracking server), or it is this very
        process and ``this_process_ended``. Runs of other hosts, and runs without the ``pid``
        tag, are left alone: their process may still be running. Returns the closed run ids.
        """
        host = platform.node()
        flt = f"attributes.status = 'RUNNING' and tags.{TAG_HOST} = '{host}'" + (f" and {where}" if where else "")
        closed = []
        for run in self.search(flt):
            pid = run.data.tags.get(TAG_PID, "")
            if not pid.isdigit():
                continue
            own = int(pid) == os.getpid()
            if (own and not this_process_ended) or (not own and process_alive(int(pid))):
                continue
            self.fail(run.info.run_id, f"orphaned: process {pid} on {host} ended without closing this run "
                                       "(killed, out of memory, or its tracking store was unreachable)")
            closed.append(run.info.run_id)
        if closed:
            log.warning("ended FAILED %d run(s) left RUNNING by dead processes of this host (tag error=orphaned...): %s",
                        len(closed), ", ".join(closed))
        return closed


def environment_tags() -> dict[str, str]:
    tags = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "None",
        "python": platform.python_version(),
        TAG_HOST: platform.node(),
        TAG_PID: str(os.getpid()),  # with host: lets a later sweep close the run if this process dies
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        if commit:
            tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def _may_be_alive(run: Any) -> bool:
    """Whether the process that runs ``run`` may still be running: known dead only on this host."""
    tags = run.data.tags
    pid = tags.get(TAG_PID, "")
    if tags.get(TAG_HOST) != platform.node() or not pid.isdigit():
        return True
    return process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _store_creation_lock(uri: str) -> Any:
    """For a SQLite store, an exclusive lock beside the database file: MLflow creates and migrates
    the schema on first use, and two processes doing that at once fail ("duplicate column name").
    A no-op for other stores."""
    from contextlib import nullcontext

    db = sqlite_file(uri)
    return nullcontext() if db is None else file_lock(db.with_name(f".{db.name}.lock"))


def _param_value(v: Any) -> str:
    s = str(list(v)) if isinstance(v, (list, tuple)) else str(v)
    return s[:PARAM_MAX_LEN]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is skipped


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
