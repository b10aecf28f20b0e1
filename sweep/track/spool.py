"""The local spool: a run's complete record kept on disk while its tracking store does not answer.

A job whose store stays away past ``mlflow.retry_window`` keeps evaluating; its record — run name,
tags, params, metrics (step series included), artifact files, final status, and the run id when
the run was created before the outage — is written as one JSON file into ``<paths.outputs>/spool/``
(atomically: a temporary file renamed). :func:`upload_pending` replays the records of one store
and experiment once it answers again: at the end of the sweep, at the next sweep start, or
explicitly with ``python -m sweep.track upload``. A record is deleted only after its run is
complete in the store, so a crash during an upload loses nothing (replaying a record is
idempotent: same params, same metrics, the run ended again).

Records name their store by a hash of its URI (URIs may carry credentials; the file shows only the
redacted form), so a spool shared by several stores uploads each record to its own store.
Artifact files are referenced where the job wrote them (its output folder), not copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sweep import contract
from sweep.assets import atomic_write, file_lock
from sweep.config.spec import TrackSpec

log = logging.getLogger(__name__)

FORMAT = 1
LOCK = ".upload.lock"
QUICK_WINDOW = 3.0  # seconds: an interrupted job ends its run promptly or spools it
EXIT_PENDING = 3    # exit status: everything evaluated, but run records wait in the spool for the store


def store_key(uri: str, experiment: str) -> str:
    """The identity of a (store, experiment) pair in a record: the URI itself may hold a password."""
    return hashlib.sha256(f"{uri}\n{experiment}".encode()).hexdigest()[:16]


@dataclass
class RunRecord:
    """Everything one MLflow run should hold, independent of whether the store answered.

    ``run_id``: the run already created in the store (None: create it on upload, nested under the
    parent run of ``sweep_id`` when there is one). ``role``: ``job`` or ``parent`` (parents are
    uploaded after their jobs). ``status``: the run's final MLflow status.
    """

    name: str
    store: str
    store_display: str
    role: str = contract.ROLE_JOB
    run_id: str | None = None
    sweep_id: str | None = None
    config_hash: str | None = None
    status: str = "FINISHED"
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    format: int = FORMAT

    @classmethod
    def of(cls, track: TrackSpec, name: str, **fields: Any) -> "RunRecord":
        """The record of run ``name`` in ``track``'s store and experiment."""
        return cls(name, store_key(track.uri, track.experiment), contract.redact(track.uri), **fields)

    def save(self, spool: Path) -> Path:
        spool.mkdir(parents=True, exist_ok=True)
        path = spool / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.role}-{uuid.uuid4().hex[:8]}.json"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(self), indent=1, default=str)))

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or d.get("format") != FORMAT or not d.get("name") or not d.get("store"):
            raise ValueError(f"{path} is not a spooled run record (format {FORMAT})")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _records(spool: Path, store: str | None = None) -> list[tuple[RunRecord, Path]]:
    """The records in ``spool`` (of one store when given) with their files, oldest first."""
    if not spool.is_dir():
        return []
    found = []
    for path in sorted(spool.glob("*.json")):
        try:
            record = RunRecord.load(path)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("spool: ignoring %s (%s)", path, exc)
            continue
        if store is None or record.store == store:
            found.append((record, path))
    return found


def pending(spool: Path, store: str | None = None) -> list[Path]:
    """The record files in ``spool`` (of one store when given), oldest first."""
    return [path for _, path in _records(spool, store)]


def upload_pending(tracker: Any, spool: Path) -> tuple[int, int]:
    """Replay the spooled records of ``tracker``'s store and experiment into it, jobs before parents.

    Returns ``(uploaded, still pending)``. Stops at the first record the store does not take
    (``TrackingError``: it went away again); the rest stay for the next attempt. Runs under a lock
    in the spool folder, so two processes never replay the same record.
    """
    from sweep.track.tracker import TrackingError

    if not spool.is_dir():  # nothing was ever spooled: no lock file either
        return 0, 0
    uploaded = 0
    with file_lock(spool / LOCK):
        records = sorted(_records(spool, store_key(tracker.uri, tracker.experiment)),
                         key=lambda rp: rp[0].role == contract.ROLE_PARENT)
        for record, path in records:
            try:
                run_id = replay(tracker, record)
            except TrackingError as exc:
                log.warning("spool: the store stopped answering during the upload (%s); %d record(s) still "
                            "pending in %s", exc, len(records) - uploaded, spool)
                break
            path.unlink()
            uploaded += 1
            log.info("spool: uploaded %s %s as run %s", record.role, record.name, run_id)
    return uploaded, len(records) - uploaded


def replay(tracker: Any, record: RunRecord) -> str:
    """Make the store hold ``record``: log into its run (or create it), then end it with its status."""
    from mlflow.exceptions import MlflowException

    run_id = record.run_id
    existing_tags: dict[str, str] = {}
    if run_id is not None:
        try:
            existing_tags = dict(tracker._call(tracker.client.get_run, run_id).data.tags)
        except MlflowException:  # the run is gone (deleted, or another store): create it afresh
            run_id = None
    if run_id is None and record.role == contract.ROLE_JOB and record.config_hash:
        prev = tracker.finished_run(record.config_hash)
        if prev is not None:  # the point was evaluated and logged meanwhile (another sweep): keep one run
            log.info("spool: %s is already in the store as run %s; not uploaded twice", record.name, prev.info.run_id)
            if record.sweep_id:
                tracker.log(prev.info.run_id, tags={contract.also_in_sweep_tag(record.sweep_id): "true"})
            return prev.info.run_id
    if run_id is None:
        run_id = tracker.start_job_run(record.name, record.tags, record.sweep_id) \
            if record.role == contract.ROLE_JOB else tracker.start_run(record.name, record.tags)
    tracker.log(run_id, params=record.params, metrics=record.metrics, tags=record.tags)
    tracker.log_artifacts(run_id, [Path(a) for a in record.artifacts if Path(a).is_file()])
    missing = [a for a in record.artifacts if not Path(a).is_file()]
    if missing:
        log.warning("spool: %d artifact file(s) of %s are gone and were not uploaded: %s", len(missing), record.name,
                    ", ".join(missing[:3]))
    if record.status == "FINISHED" and contract.TAG_ERROR not in record.tags and contract.TAG_ERROR in existing_tags:
        # another process closed the run as orphaned while its record waited here
        tracker._call(tracker.client.delete_tag, run_id, contract.TAG_ERROR)
    tracker.end(run_id, record.status)
    return run_id


class RunSink:
    """One run's writes: sent to the store while it answers, kept in a :class:`RunRecord` always.

    Once the store fails past its retry window (``TrackingError``) the sink goes offline for good
    (later writes only update the record) and :meth:`end` saves the record into the spool. The job
    never stops for its tracking store.
    """

    def __init__(self, tracker: Any | None, spool: Path | None, record: RunRecord) -> None:
        self.tracker = tracker
        self.spool = spool
        self.record = record
        self.spooled: Path | None = None

    @property
    def run_id(self) -> str | None:
        return self.record.run_id

    @property
    def online(self) -> bool:
        """Whether writes still reach the store: it answered, and the run exists there."""
        return self.tracker is not None and self.record.run_id is not None

    def _send(self, what: str, write: Callable[[Any], Any]) -> None:
        """``write(tracker)`` while the store answers; on ``TrackingError`` the sink goes offline."""
        from sweep.track.tracker import TrackingError

        if self.tracker is None:
            return
        try:
            write(self.tracker)
        except TrackingError as exc:
            log.warning("tracking: %s of %s not logged (%s); the run's record is kept locally and uploaded when "
                        "the store answers again", what, self.record.name, exc)
            self.tracker = None

    def start(self) -> None:
        """Create the job's run (nested under its sweep's parent run) when the store answers."""
        r = self.record

        def create(tracker: Any) -> None:
            r.run_id = tracker.start_job_run(r.name, r.tags, r.sweep_id)

        self._send("the run's creation", create)

    def log(self, params: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None) -> None:
        self.record.params.update(params or {})
        self.record.metrics.update(metrics or {})
        self.record.tags.update({k: str(v) for k, v in (tags or {}).items()})
        if self.online:
            self._send("params/metrics/tags", lambda t: t.log(self.run_id, params=params, metrics=metrics, tags=tags))

    def log_artifacts(self, paths: list[Path]) -> None:
        self.record.artifacts.extend(str(Path(p).resolve()) for p in paths)
        if self.online:
            self._send("artifacts", lambda t: t.log_artifacts(self.run_id, paths))

    def end(self, status: str, quick: bool = False) -> bool:
        """End the run with ``status``; True when the record had to be spooled (upload pending).
        ``quick``: retry for a few seconds at most (the process is being interrupted)."""
        self.record.status = status
        if self.online:
            if quick:
                self.tracker.retry_window = min(self.tracker.retry_window, QUICK_WINDOW)
            self._send("the run's end", lambda t: t.end(self.run_id, status))
        if self.online:
            return False
        if self.spool is None:
            log.error("tracking: %s could not be logged and no spool folder is set: its record is lost", self.record.name)
            return False
        self.spooled = self.record.save(self.spool)
        log.warning("tracking: %s (%s) kept in %s until the store %s answers", self.record.name, status,
                    self.spooled, self.record.store_display)
        return True


def pending_message(count: int, track: TrackSpec) -> str:
    """What to do about records left in the spool (the summary's last line)."""
    outputs = track.spool.parent if track.spool else Path(contract.DEFAULT_OUTPUTS)
    return (f"{count} run record(s) pending upload in {track.spool}: the MLflow store {contract.redact(track.uri)} did "
            f"not answer. They are uploaded at the next sweep start, or now with: python -m sweep.track upload "
            f"--outputs {outputs}" + ("" if track.uri == contract.default_store(outputs)[0]
                                      else f" --tracking-uri {contract.redact(track.uri)}"))
