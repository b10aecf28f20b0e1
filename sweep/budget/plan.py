"""The budget sweeper's jobs as Hydra overrides: the combinations of every axis but sparsity, their
dense references, the overrides of a point, and the configs checked before the sweep starts.

Shared by the sweeper plugin (``hydra_plugins/budget_sweeper``) and the sweep callback's pre-flight, so
both see the same combinations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from sweep.config.schema import ConfigError

SEARCHED = "sparsity"
# The dense reference's config hash ignores the pruning options (and recovery is none), so combinations that
# differ only in these share one dense point.
DENSE_IGNORES = ("prune", "recover")


def override_key(override: str) -> str:
    """``+prune.include=[a]`` -> ``prune.include`` (``+``/``++``/``~`` prefixes dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def _under(key: str, groups: Sequence[str]) -> bool:
    return any(key == g or key.startswith(g + ".") or key.startswith(g + "@") for g in groups)


@dataclass(frozen=True)
class Combination:
    """One combination of the other axes: its overrides, and the dense group it shares a reference with."""

    index: int
    overrides: tuple[str, ...]

    @property
    def dense_group(self) -> tuple[str, ...]:
        """Its overrides but the pruning and recovery ones: combinations equal in these share a dense point."""
        return tuple(o for o in self.overrides if not _under(override_key(o), DENSE_IGNORES))

    def point(self, sparsity: float) -> list[str]:
        return [*self.overrides, f"{SEARCHED}={sparsity:g}"]

    def dense(self) -> list[str]:
        """The dense reference: sparsity 0 without recovery (the pruning options stay: the hash ignores them)."""
        kept = [o for o in self.overrides if override_key(o) not in ("recover", "recover.method")]
        return [*kept, "recover=none", f"{SEARCHED}=0"]


def expand(params: Mapping[str, Any] | None, arguments: Sequence[str],
           parser: OverridesParser | None = None) -> list[list[str]]:
    """Every job's overrides of a grid, as Hydra's basic sweeper expands them: the sweeper's ``params``, then
    the command line (comma lists and ranges become the grid), in job order. ``parser``: one with a config
    loader for ``glob(...)`` over config groups."""
    return _split(_parse(params, arguments, parser))


def _split(parsed: list) -> list[list[str]]:
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _parse(params: Mapping[str, Any] | None, arguments: Sequence[str], parser: OverridesParser | None) -> list:
    parser = parser or OverridesParser.create()
    return parser.parse_overrides([f"{k}={v}" for k, v in (params or {}).items()] + list(arguments))


def combinations(params: Mapping[str, Any] | None, arguments: Sequence[str],
                 parser: OverridesParser | None = None) -> list[Combination]:
    """Every combination of the sweeper's ``params`` and the command line's overrides (expanded as the basic
    sweeper expands a grid). Sparsity among them is refused: it is what the search finds."""
    parsed = _parse(params, arguments, parser)
    for o in parsed:
        if o.key_or_group == SEARCHED:
            given = (o.input_line or "").split("=", 1)[-1]
            raise ConfigError(f"sparsity={given} is given, but the budget sweeper searches the "
                              "sparsity: allowed is no sparsity override with hydra/sweeper=budget (set the range "
                              "with budget.hi and budget.tol)")
    return [Combination(i, tuple(job)) for i, job in enumerate(_split(parsed))]


def dense_groups(combos: Sequence[Combination]) -> dict[tuple[str, ...], list[int]]:
    """Dense group -> the combinations (indices) sharing its reference; the first one's overrides run it."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for c in combos:
        groups.setdefault(c.dense_group, []).append(c.index)
    return groups


def preflight_overrides(combos: Sequence[Combination], top: float) -> list[tuple[int, bool, list[str]]]:
    """(combination, is the dense reference, overrides) of the configs to check before the sweep: every
    combination at sparsity 0 and at the highest searched point ``top``, and every dense reference."""
    out: list[tuple[int, bool, list[str]]] = []
    for c in combos:
        out += [(c.index, False, c.point(0.0)), (c.index, False, c.point(top))]
    firsts = {members[0] for members in dense_groups(combos).values()}
    return out + [(c.index, True, c.dense()) for c in combos if c.index in firsts]
