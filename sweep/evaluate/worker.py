"""The COCO evaluation of a point in a worker process, so that it overlaps the job's later stages (latency,
profile, export) and, in a sequential sweep, the next point's load, prune and forward pass.

One worker per process that asks (the sequential launcher's process, each joblib or Slurm worker), started
on first use with ``spawn`` (never a fork of a process with CUDA and OpenMP threads), evaluating one point at
a time in order. The ground truth crosses once per dataset: the worker keeps the last one by its key; the
detections cross as columns (a few arrays, not a million dicts). The worker ignores Ctrl-C and SIGTERM (the
sweep decides what an interruption means) and ends with its parent. If it cannot run, or dies, the evaluation
runs in this process instead, with a warning: slower, never lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sweep.evaluate.coco import CocoColumns, CocoResult, evaluate_columns

log = logging.getLogger(__name__)

_WORKER_GROUND_TRUTH: dict[str, dict[str, Any]] = {}  # in the worker: the last dataset's ground truth by key


@dataclass
class Evaluated:
    """A COCO result and when it was computed (``time.time()`` stamps: comparable across the processes)."""

    result: CocoResult
    started: float
    ended: float
    where: str  # "worker" or "in-process"

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group, and Slurm's or timeout's SIGTERM every process: the sweep decides
    # what an interruption means (it completes the jobs waiting for this worker first, then ends it: stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _evaluate(where: str, ground_truth: dict[str, Any], columns: CocoColumns, image_ids: list, backend: str,
              bootstrap: int) -> Evaluated:
    t0 = time.time()
    return Evaluated(evaluate_columns(ground_truth, columns, image_ids, backend, bootstrap), t0, time.time(), where)


def _evaluate_in_worker(key: str, ground_truth: dict[str, Any] | None, columns: CocoColumns, image_ids: list,
                        backend: str, bootstrap: int) -> Evaluated:
    if ground_truth is not None:
        _WORKER_GROUND_TRUTH.clear()
        _WORKER_GROUND_TRUTH[key] = ground_truth
    return _evaluate("worker", _WORKER_GROUND_TRUTH[key], columns, image_ids, backend, bootstrap)


class PendingEvaluation:
    """A submitted evaluation: ``result()`` waits for it. If the worker died meanwhile, the point is evaluated
    in this process instead (a COCO error itself is raised, as it would be in process)."""

    def __init__(self, future: Future | None, here: Callable[[], Evaluated]) -> None:
        self._future, self._here, self._value = future, here, None if future is not None else here()

    def result(self) -> Evaluated:
        if self._value is None:
            try:
                self._value = self._future.result()  # type: ignore[union-attr]
            except BrokenProcessPool as exc:
                log.warning("the COCO worker process died (%s): evaluating this point in this process", exc)
                self._value = self._here()
        return self._value


class CocoWorker:
    """``submit(...)`` -> a :class:`PendingEvaluation`; points are evaluated in submission order."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._sent: str | None = None  # the ground truth key the worker holds
        self._worked = False           # a worker of this process finished an evaluation
        self._disabled = False         # a worker died before its first one: this process cannot run one
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker now, from a thread of its own: spawning takes seconds, done while the job loads,
        prunes and runs the model; and a Ctrl-C (raised in the main thread) never cuts a spawn in half, which
        would leave the child a truncated start-up message to choke on."""
        if self._pool is None and not self._disabled:
            threading.Thread(target=self._start_now, name="coco-worker-start", daemon=True).start()

    def _start_now(self) -> None:
        try:
            self._ensure_pool().submit(os.getpid)
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            self._give_up(exc)

    def _ensure_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_quiet_worker)
                self._sent = None
            return self._pool

    def _give_up(self, exc: BaseException) -> None:
        log.warning("COCO worker process unavailable (%s): evaluating in the job's process", exc)
        self._disabled = True
        self._drop()

    def submit(self, key: str, ground_truth: dict[str, Any], columns: CocoColumns, image_ids: Sequence[Any],
               backend: str, bootstrap: int) -> PendingEvaluation:
        ids = list(image_ids)

        def here() -> Evaluated:
            if not self._worked:  # died before it ever evaluated: do not start one per job in vain
                self._disabled = True
            self._drop()  # a worker that died after working is replaced at the next submit
            return _evaluate("in-process", ground_truth, columns, ids, backend, bootstrap)

        if self._disabled:
            return PendingEvaluation(None, here)
        try:
            pool = self._ensure_pool()
            gt = None if self._sent == key else ground_truth
            future = pool.submit(_evaluate_in_worker, key, gt, columns, ids, backend, bootstrap)
            self._sent = key
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            self._give_up(exc)
            return PendingEvaluation(None, here)
        future.add_done_callback(self._note_success)
        return PendingEvaluation(future, here)

    def _note_success(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._worked = True

    def _drop(self, kill: bool = False) -> None:
        with self._lock:
            pool, self._pool, self._sent = self._pool, None, None
        if pool is not None:
            if kill:
                for proc in list(getattr(pool, "_processes", {}).values()):  # no public way before Python 3.14
                    proc.kill()  # it ignores SIGTERM
            pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """End the worker now, dropping what it has not evaluated (an interrupted sweep, after the jobs that
        waited for it were completed): exiting then does not wait for a worker still importing its modules."""
        self._drop(kill=True)

    def shutdown(self) -> None:
        """Wait for the submitted evaluations, then end the worker."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool, self._sent = None, None


def evaluate_here(ground_truth: dict[str, Any], columns: CocoColumns, image_ids: Sequence[Any], backend: str,
                  bootstrap: int) -> PendingEvaluation:
    """The same evaluation in this process, now (``eval.coco_worker=false``)."""
    return PendingEvaluation(None, lambda: _evaluate("in-process", ground_truth, columns, list(image_ids), backend,
                                                     bootstrap))


_PER_PROCESS: dict[int, CocoWorker] = {}


def coco_worker() -> CocoWorker:
    """This process's COCO worker (created, not started, on first call; keyed by pid like the process memo)."""
    pid = os.getpid()
    if pid not in _PER_PROCESS:
        _PER_PROCESS.clear()
        _PER_PROCESS[pid] = CocoWorker()
    return _PER_PROCESS[pid]
