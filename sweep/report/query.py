"""MLflow -> pandas: select the runs of one sweep (or of the whole experiment), one row per run.

Only the tracking server is read (never the outputs folder). Selection, in order of precedence:

- ``parent_run_id``: the children of that parent run (tag ``mlflow.parentRunId``);
- ``sweep=<id>``: the job runs tagged ``sweep_id=<id>``, attached to the latest parent with that id;
- ``sweep="all"``: every FINISHED job run of the experiment, no parent;
- nothing: the most recent sweep, i.e. the parent run (``sweep.role=parent``) with the latest start time.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import unquote, urlparse

import pandas as pd

from sweep import contract
from sweep.contract import ROLE_JOB, ROLE_PARENT, TAG_PARENT_RUN, TAG_ROLE, TAG_SWEEP_ID

from .common import ALL, ReportError, plural

log = logging.getLogger(__name__)

@dataclass
class Selection:
    """The runs a report is about."""

    tracking_uri: str
    experiment_id: str
    experiment_name: str
    sweep_id: str                      # "all" for the whole experiment
    mode: str                          # "parent" | "sweep" | "latest" | "all"
    parent: Optional[object] = None    # mlflow.entities.Run or None
    runs: list = field(default_factory=list)  # list[mlflow.entities.Run], job runs only
    notes: list[str] = field(default_factory=list)
    client: Optional[object] = field(default=None, repr=False)  # the MlflowClient that selected the runs

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.parent.info.run_id if self.parent is not None else None


def check_store(tracking_uri: str) -> None:
    """Refuse a local store that does not exist (MLflow would silently create an empty one)."""
    parsed = urlparse(tracking_uri)
    path: Optional[str] = None
    if parsed.scheme.startswith("sqlite"):
        # SQLAlchemy: sqlite:///relative.db, sqlite:////absolute/path.db
        raw = tracking_uri.split(":///", 1)[1] if ":///" in tracking_uri else ""
        raw = unquote(raw.split("?", 1)[0])
        if raw and raw != ":memory:":
            path = raw
    elif parsed.scheme == "file":
        path = unquote(parsed.path)
    elif parsed.scheme == "" and tracking_uri:
        path = tracking_uri
    if path is not None and not Path(path).exists():
        raise ReportError(f"no MLflow store at {path} (tracking URI {tracking_uri}): run a sweep first, "
                          f"or pass --tracking-uri / set MLFLOW_TRACKING_URI")


def client_for(tracking_uri: str):
    check_store(tracking_uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _quote(value: str) -> Optional[str]:
    """A filter-string literal, or None when the value cannot be quoted safely (filter in Python then)."""
    if "'" in value or "\\" in value:
        return None
    return f"'{value}'"


def search_all(client, experiment_ids: list[str], filter_string: str = "",
               order_by: Optional[list[str]] = None, max_results: Optional[int] = None) -> list:
    """Every run matching the filter (follows page tokens)."""
    out: list = []
    token = None
    while True:
        page_size = 1000 if max_results is None else min(1000, max_results - len(out))
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=page_size,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token or (max_results is not None and len(out) >= max_results):
            return out


def _role(run) -> Optional[str]:
    return run.data.tags.get(TAG_ROLE)


def _jobs(runs: Iterable) -> list:
    """Job runs: everything but parents (runs without a role tag count as jobs if they have a model)."""
    out = []
    for r in runs:
        role = _role(r)
        if role == ROLE_PARENT:
            continue
        if role == ROLE_JOB or "model.name" in r.data.params:
            out.append(r)
    return out


def _experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=20)]
        raise ReportError(f"experiment {name!r} not found in the MLflow store; "
                          f"known experiments: {', '.join(names) or 'none'}")
    return exp


def _parents(client, experiment_id: str, extra_filter: str = "", max_results: Optional[int] = None) -> list:
    """Sweep parent runs (tag ``sweep.role=parent``), most recent first; ``extra_filter`` is and-ed."""
    filter_string = f"tags.`{TAG_ROLE}` = '{ROLE_PARENT}'" + (f" and {extra_filter}" if extra_filter else "")
    return search_all(client, [experiment_id], filter_string, order_by=["attributes.start_time DESC"],
                      max_results=max_results)


def _recent_sweeps(client, experiment_id: str, n: int = 5) -> list[str]:
    return [p.data.tags.get(TAG_SWEEP_ID, p.info.run_id) for p in _parents(client, experiment_id, max_results=n)]


def _members(client, eid: str, sweep_ids: list[str], parent_id: Optional[str]) -> tuple[list, int]:
    """The job runs of a sweep and how many of them were reused from earlier sweeps.

    Members: children of the parent run, runs tagged ``sweep_id=<id>``, and FINISHED runs of earlier
    sweeps that this sweep skipped as already done (resume by config hash tags them
    ``also_in_sweep.<id>=true``), for every launch id of the sweep (an interrupted sweep continued by
    the same command keeps its parent run; each launch has its own id). With sweep ids the children
    need no search of their own: a job is only nested under the parent of its own ``sweep_id``
    (sweep/job.py), so the tag search finds them.
    """
    found: dict[str, object] = {}
    if parent_id and not sweep_ids:
        for r in search_all(client, [eid], f"tags.`{TAG_PARENT_RUN}` = '{parent_id}'"):
            found[r.info.run_id] = r
    reused = []
    for sweep_id in sweep_ids:
        q = _quote(sweep_id)
        if q is not None and "`" not in sweep_id:
            tagged = search_all(client, [eid], f"tags.{TAG_SWEEP_ID} = {q}")
            also = search_all(client, [eid], f"tags.`{contract.also_in_sweep_tag(sweep_id)}` = 'true'")
        else:  # an id the filter syntax cannot quote: filter in Python
            every = search_all(client, [eid])
            tagged = [r for r in every if r.data.tags.get(TAG_SWEEP_ID) == sweep_id]
            also = [r for r in every if r.data.tags.get(contract.also_in_sweep_tag(sweep_id)) == "true"]
        for r in tagged:
            found[r.info.run_id] = r
        for r in also:
            if r.info.run_id not in found and r.info.status == "FINISHED":
                found[r.info.run_id] = r
                reused.append(r)
    reused = [r for r in reused if r.data.tags.get(TAG_SWEEP_ID) not in sweep_ids]  # its own earlier launch: no reuse
    jobs = sorted(_jobs(found.values()), key=lambda r: r.info.start_time or 0)
    return jobs, len(reused)


def select_runs(tracking_uri: str, experiment: str, sweep: Optional[str] = None,
                parent_run_id: Optional[str] = None) -> Selection:
    """Resolve the user's selection to a parent run (maybe none) and its job runs."""
    if sweep is not None and parent_run_id is not None:
        raise ReportError("give either a sweep id or a parent run id, not both")
    client = client_for(tracking_uri)
    notes: list[str] = []

    if parent_run_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as e:
            raise ReportError(f"parent run {parent_run_id!r} not found in {tracking_uri}") from e
        exp = client.get_experiment(parent.info.experiment_id)
        sweep_id = parent.data.tags.get(TAG_SWEEP_ID)
        jobs, reused = _members(client, exp.experiment_id, contract.sweep_ids(parent.data.tags), parent_run_id)
        mode, eid = "parent", exp.experiment_id
    else:
        exp = _experiment(client, experiment)
        eid = exp.experiment_id
        if sweep == ALL:
            runs = [r for r in _jobs(search_all(client, [eid])) if r.info.status == "FINISHED"]
            return Selection(tracking_uri, eid, exp.name, ALL, "all", None, runs, client=client)
        if sweep is None:
            latest = _parents(client, eid, max_results=1)
            if not latest:
                raise ReportError(f"experiment {exp.name!r} has no sweep parent runs (tag {TAG_ROLE}={ROLE_PARENT}); "
                                  f"pass --sweep ID, --parent-run-id ID or --all")
            parent, mode = latest[0], "latest"
            sweep_id = parent.data.tags.get(TAG_SWEEP_ID)
        else:
            mode, sweep_id = "sweep", sweep
            q = _quote(sweep)
            if q is not None:
                parents = _parents(client, eid, f"tags.sweep_id = {q}")
                parents = parents or _parents(client, eid, f"tags.`{contract.continued_tag(sweep)}` = 'true'")
            else:
                parents = [r for r in _parents(client, eid) if sweep in contract.sweep_ids(r.data.tags)]
            parent = parents[0] if parents else None
            if len(parents) > 1:
                notes.append(f"{len(parents)} parent runs carry sweep_id={sweep}; attached to the latest "
                             f"({parent.info.run_id})")
        ids = contract.sweep_ids(parent.data.tags) if parent is not None else [sweep_id] if sweep_id else []
        jobs, reused = _members(client, eid, ids, parent.info.run_id if parent is not None else None)
        if mode == "sweep" and parent is None:
            if not jobs:
                recent = _recent_sweeps(client, eid)
                raise ReportError(f"no runs with sweep_id={sweep!r} in experiment {exp.name!r}; "
                                  f"recent sweeps: {', '.join(recent) or 'none'}")
            notes.append(f"no parent run with sweep_id={sweep}: report not attached to MLflow")
    if reused:
        what = "of an earlier sweep was" if reused == 1 else "of earlier sweeps were"
        notes.append(f"{plural(reused, 'finished run')} {what} reused by this sweep (resume by config hash) "
                     f"and {'is' if reused == 1 else 'are'} included")
    label = sweep_id or (parent.info.run_id if parent is not None else "sweep")
    return Selection(tracking_uri, eid, exp.name, label, mode, parent, jobs, notes, client)


def _ts(ms: Optional[int]) -> pd.Timestamp:
    if ms is None:
        return pd.NaT
    return pd.Timestamp(datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc))


def runs_frame(runs: list) -> pd.DataFrame:
    """One row per run: run_id, run_name, status, start/end time, then ``params.*``, ``metrics.*``
    and ``tags.*`` (MLflow-internal ``mlflow.*`` tags left out, except the parent id column)."""
    rows = []
    for r in runs:
        row: dict = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "start_time": _ts(r.info.start_time),
            "end_time": _ts(r.info.end_time),
            "parent_run_id": r.data.tags.get(TAG_PARENT_RUN),
        }
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"metrics.{k}": float(v) for k, v in r.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()
                    if not (k.startswith("mlflow.") or contract.is_also_in_sweep_tag(k))})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    fixed = ["run_id", "run_name", "status", "start_time", "end_time", "parent_run_id"]
    rest = sorted(c for c in df.columns if c not in fixed)
    names = [c[len("metrics."):] for c in df.columns if c.startswith("metrics.")]
    rank = {f"metrics.{m}": i for i, m in enumerate(contract.metric_order(names))}  # the metrics.json order first
    metrics = sorted((c for c in rest if c.startswith("metrics.")), key=lambda c: (rank.get(c, len(rank)), c))
    order = ([c for c in rest if c.startswith("params.")] + metrics + [c for c in rest if c.startswith("tags.")])
    return df[fixed + order]


def find_dense_runs(selection: Selection, models: list[str]) -> list:
    """FINISHED job runs of the experiment for these models (candidates for a missing dense reference)."""
    client = selection.client or client_for(selection.tracking_uri)
    out = []
    for m in models:
        q = _quote(m)
        if q is None:
            continue
        runs = search_all(client, [selection.experiment_id],
                          f"params.`model.name` = {q} and attributes.status = 'FINISHED'",
                          order_by=["attributes.start_time DESC"])
        out.extend(_jobs(runs))
    return out


def read_artifact_csv(selection: Selection, run_id: str, name: str) -> Optional[pd.DataFrame]:
    """A run's CSV artifact ``name`` as a frame, or None when the run has none (or it cannot be read)."""
    client = selection.client or client_for(selection.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
            return pd.read_csv(path)
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable artifact leaves that figure out
            log.warning("run %s: artifact %s not read (%s): left out of the report", run_id, name, exc)
            return None


def attach(selection: Selection, files: list[Path], artifact_path: str) -> None:
    """Log the report files on the parent run under ``artifact_path``."""
    if selection.parent is None:
        return
    client = selection.client or client_for(selection.tracking_uri)
    for f in files:
        client.log_artifact(selection.parent.info.run_id, str(f), artifact_path)
