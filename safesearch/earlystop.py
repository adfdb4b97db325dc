"""Early stopping of hopeless trials (multi-fidelity): decide from a first slice of the items.

On a real model a trial's merge costs milliseconds and its evaluation minutes, so a trial that is plainly
infeasible or plainly dominated should not be scored to the end. A trial first scores a slice of every
suite (:func:`slices`: the items of lowest seeded rank, so the slice is the same for every trial); it is
stopped when, at the spec's one-sided confidence (Wilson bounds on the slice's rates,
:mod:`safesearch.rates`):

- a constraint is already broken: even the bound most favourable to the trial is beyond it, or
- a feasible trial of the current front dominates the trial's optimistic point (every objective at its
  most favourable bound).

Both tests give the trial the benefit of the doubt, so with 95% confidence per bound a trial that would
have been feasible and on the front is rarely stopped. Baselines always run to the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from safesearch.pareto import dominates
from safesearch.rates import lower_bound, upper_bound
from safesearch.studyspec import Constraint, EarlyStop, Objective


def slice_size(n: int, fraction: float) -> int:
    """Items scored first out of ``n``: at least one, and (for n > 1) at least one left for later."""
    return n if n <= 1 else min(n - 1, max(1, round(n * fraction)))


def split_items(ranks: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(indices scored first, the rest), both in the items' order: the first are the ``fraction`` of
    lowest ``ranks`` (the seeded order of :func:`safesearch.evaluate.subset_rank`)."""
    k = slice_size(len(ranks), fraction)
    first = set(sorted(range(len(ranks)), key=lambda i: (ranks[i], i))[:k])
    return [i for i in range(len(ranks)) if i in first], [i for i in range(len(ranks)) if i not in first]


@dataclass(frozen=True)
class Measured:
    """A rate and the number of items it rests on."""

    rate: float
    n: float


def constraint_broken(c: Constraint, m: Measured, confidence: float) -> str | None:
    """Why ``c`` is broken beyond doubt on ``m`` (None: it may hold)."""
    if math.isnan(m.rate) or m.n <= 0:
        return None
    if c.max is not None:
        low = lower_bound(m.rate, m.n, confidence)
        if low > c.max:
            return (f"{c.name} {m.rate:.3f} on {m.n:g} items, at least {low:.3f} at {confidence:g} confidence, "
                    f"above max {c.max:g}")
        return None
    high = upper_bound(m.rate, m.n, confidence)
    if high < c.min:  # type: ignore[operator]
        return (f"{c.name} {m.rate:.3f} on {m.n:g} items, at most {high:.3f} at {confidence:g} confidence, "
                f"below min {c.min:g}")
    return None


def optimistic(objectives: Sequence[Objective], measured: Mapping[str, Measured], confidence: float) -> dict[str, float]:
    """Each objective at its most favourable bound (upper when maximised, lower when minimised)."""
    out = {}
    for o in objectives:
        m = measured[o.name]
        bound = upper_bound if o.direction == "maximize" else lower_bound
        out[o.name] = bound(m.rate, m.n, confidence) if m.n > 0 and not math.isnan(m.rate) else math.nan
    return out


def dominated_by(best: Mapping[str, float], front: Sequence[tuple[int, Mapping[str, float]]],
                 directions: Mapping[str, str]) -> int | None:
    """The number of the first front trial that dominates the point ``best`` (None: none does, or
    ``best`` is unknown on some objective)."""
    if any(math.isnan(v) for v in best.values()):
        return None
    for number, scores in front:
        if dominates(scores, best, directions):
            return number
    return None


def hopeless(
    rule: EarlyStop,
    objectives: Sequence[Objective],
    constraints: Sequence[Constraint],
    measured: Mapping[str, Measured],
    front: Sequence[tuple[int, Mapping[str, float]]],
) -> str | None:
    """Why a trial measured so far (``measured``: objective or constraint name -> rate and items) should
    stop, or None to finish it. ``front``: (trial number, search scores) of the current feasible front."""
    for c in constraints:
        why = constraint_broken(c, measured[c.name], rule.confidence)
        if why:
            return why
    if rule.dominated and front:
        best = optimistic(objectives, measured, rule.confidence)
        by = dominated_by(best, front, {o.name: o.direction for o in objectives})
        if by is not None:
            shown = ", ".join(f"{n} at best {v:.3f}" for n, v in best.items())
            return f"dominated by trial {by} even at its bounds ({shown}, {rule.confidence:g} confidence)"
    return None
