"""The budget search as a pure algorithm: per combination, the highest sparsity whose metric keeps
``keep`` x the dense model's, by bisection (k-section with n points per round) over a metric oracle.

The search runs over the lattice of multiples of ``tol`` in [0, ``hi``]: every point it evaluates is
a point a grid sweep at step ``tol`` evaluates too (the same config hash, so resume shares them), and
the answer is exact on that lattice. Nothing here knows Hydra, MLflow or torch: the sweeper (and the
tests) hand :func:`run_rounds` an ``evaluate`` callable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

FOUND, DENSE_FAILED, ERROR, OPEN = "found", "dense_failed", "error", "open"


@dataclass(frozen=True)
class Answer:
    """What one combination's search came to.

    ``sparsity``: the highest evaluated passing point below the lowest evaluated failing one (0: no pruned
    point passed, the dense reference is the answer); None when the dense point failed. ``bracket``:
    (``sparsity``, the lowest failing point), its upper end None when no point up to ``hi`` failed.
    ``non_monotone``: a point above that failure passed (the curve is not monotone; the answer stays below
    the failure). ``points``: evaluated points, the dense reference included.
    """

    status: str
    sparsity: float | None
    value: float | None
    dense: float | None
    bracket: tuple[float, float | None] | None
    points: int
    non_monotone: bool = False
    reason: str = ""

    @property
    def retention(self) -> float | None:
        if self.value is None or not self.dense:
            return None
        return self.value / self.dense


@dataclass
class BudgetSearch:
    """One combination's search state: the dense reference, the evaluated points, the bracket they give."""

    keep: float
    tol: float
    hi: float
    dense: float | None = None
    dense_error: str = ""
    values: dict[int, float] = field(default_factory=dict)   # lattice index -> metric
    failed: set[int] = field(default_factory=set)            # lattice indices whose evaluation failed
    error: str = ""                                          # the first such failure

    @property
    def top(self) -> int:
        """The highest lattice index (``top * tol <= hi``; the epsilon absorbs float noise like 0.3 / 0.1)."""
        return int(math.floor(self.hi / self.tol + 1e-9))

    def sparsity(self, i: int) -> float:
        return round(i * self.tol, 6)

    def index(self, sparsity: float) -> int:
        return int(round(sparsity / self.tol))

    def set_dense(self, value: float | None, reason: str = "") -> None:
        if value is None or not math.isfinite(value) or value <= 0:
            self.dense_error = reason or (f"the dense metric is {value}: no retention to keep" if value is not None
                                          else "the dense point has no metric")
        else:
            self.dense = float(value)

    def record(self, sparsity: float, value: float | None, reason: str = "") -> None:
        if value is None or not math.isfinite(value):
            self.failed.add(self.index(sparsity))
            self.error = self.error or f"the point at sparsity {sparsity:g} failed: {reason or 'no metric'}"
        else:
            self.values[self.index(sparsity)] = float(value)

    def passes(self, i: int) -> bool:
        assert self.dense is not None
        return self.values[i] >= self.keep * self.dense

    def bracket(self) -> tuple[int, int]:
        """(lo, hi) lattice indices: hi the lowest failing point (``top + 1``: none failed), lo the highest
        passing point below it (0: the dense reference). Before the dense point is known: the whole range."""
        if self.dense is None:
            return 0, self.top + 1
        hi = min((i for i in self.values if not self.passes(i)), default=self.top + 1)
        lo = max((i for i in self.values if i < hi and self.passes(i)), default=0)
        return lo, hi

    def propose(self, n: int) -> list[float]:
        """The next round's points: ``n`` interior points splitting the open bracket in ``n + 1`` parts
        (every remaining one when fewer are left); none when the search is done or stopped."""
        if self.dense_error or self.error:
            return []
        lo, hi = self.bracket()
        gap = hi - lo
        if gap <= 1:
            return []
        if gap - 1 <= n:
            idx = list(range(lo + 1, hi))
        else:  # spacing gap / (n + 1) > 1, so the rounded points are distinct and strictly inside
            idx = [lo + math.floor(j * gap / (n + 1) + 0.5) for j in range(1, n + 1)]
        return [self.sparsity(i) for i in idx if i not in self.values]

    def answer(self) -> Answer:
        points = len(self.values) + len(self.failed) + (1 if self.dense is not None or self.dense_error else 0)
        if self.dense_error:
            return Answer(DENSE_FAILED, None, None, None, None, points, reason=self.dense_error)
        if self.dense is None:
            return Answer(OPEN, None, None, None, None, points, reason="the dense point was not evaluated")
        lo, hi = self.bracket()
        value = self.values[lo] if lo else self.dense  # lo > 0 is an evaluated passing point
        upper = self.sparsity(hi) if hi <= self.top else None
        above = sorted(i for i in self.values if i > hi and self.passes(i))
        notes = []
        if above:
            notes.append(f"non-monotone: {', '.join(f'{self.sparsity(i):g}' for i in above)} passed above the "
                         f"failure at {self.sparsity(hi):g}")
        if upper is None:
            notes.append(f"no failure up to {self.sparsity(self.top):g} (budget.hi)")
        if lo == 0:
            notes.append("no pruned point passed: the dense model is the answer")
        status = ERROR if self.error else FOUND if hi - lo <= 1 else OPEN
        if self.error:
            notes.insert(0, self.error)
        return Answer(status, self.sparsity(lo), value, self.dense, (self.sparsity(lo), upper), points,
                      bool(above), "; ".join(notes))


@dataclass(frozen=True)
class Probe:
    """One point to evaluate: a combination's sparsity, or (``dense``) a dense group's reference."""

    key: Hashable
    sparsity: float
    dense: bool = False


@dataclass(frozen=True)
class Result:
    value: float | None   # the metric; None: the point failed (``reason`` says why)
    reason: str = ""


def next_probes(searches: Mapping[Hashable, BudgetSearch], n: int) -> list[Probe]:
    return [Probe(key, s) for key, search in searches.items() for s in search.propose(n)]


def run_rounds(searches: Mapping[Hashable, BudgetSearch], dense_groups: Mapping[Hashable, Sequence[Hashable]],
               n: int, evaluate: Callable[[list[Probe]], Sequence[Result]]) -> int:
    """Run every search to its end, one ``evaluate`` call per round; returns the number of rounds.

    Round 1 holds every dense group's reference (one per group: the combinations that share a dense point)
    and the first ``n`` points of every combination (their pass/fail is judged once the reference is in);
    each later round ``n`` points of every open bracket.
    """
    probes = [Probe(group, 0.0, dense=True) for group in dense_groups] + next_probes(searches, n)
    rounds = 0
    while probes:
        rounds += 1
        for probe, result in zip(probes, evaluate(probes), strict=True):
            if probe.dense:
                for key in dense_groups[probe.key]:
                    searches[key].set_dense(result.value, result.reason)
            else:
                searches[probe.key].record(probe.sparsity, result.value, result.reason)
        probes = next_probes(searches, n)
    return rounds
