"""Reading a study: its trials as plain records, the Pareto front, the picks (the plot: safesearch.frontplot).

The front is computed from each trial's ``scores`` user attr (the objectives on the search split), not
from Optuna's values, so that the single-objective mode (CMA-ES on a weighted sum) has a front too. Only
feasible trials (every constraint value <= 0) compete when any trial is feasible. Baselines take part
like any trial and are marked.

Picks: ``max-safety`` / ``max-medical`` are the front's best trial on the objective named ``safety`` /
``medical`` (else the first / second objective), ties broken by the other objectives; ``knee`` is the
front's trial closest to the ideal point once every objective is scaled to [0, 1] over the front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from safesearch.errors import UserError

PICKS = ("knee", "max-safety", "max-medical")


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str
    scores: dict[str, float]
    constraints: dict[str, float] = field(default_factory=dict)  # Optuna's values: <= 0 is feasible
    constraint_scores: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)
    holdout: dict[str, Any] | None = None  # from `safesearch validate`
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            "state": self.state,
            "baseline": self.baseline,
            "scores": self.scores,
            "constraint_scores": self.constraint_scores,
            "feasible": self.feasible,
            "holdout": self.holdout,
            "coefficients": self.coefficients,
            "suites": self.suites,
            "seconds": self.seconds,
        }


def records(study: optuna.Study, states: Sequence[TrialState] = (TrialState.COMPLETE,)) -> list[TrialRecord]:
    """The study's trials (COMPLETE by default) as records, with their holdout scores where validated."""
    from safesearch.dashboard import named_constraints
    from safesearch.search import BASELINE_ATTR, HOLDOUT_TRIAL

    attrs = study.user_attrs
    out = []
    for t in study.get_trials(deepcopy=False, states=tuple(states)):
        u = t.user_attrs
        out.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                scores=dict(u.get("scores", {})),
                constraints=named_constraints(t.constraints),
                constraint_scores=dict(u.get("constraint_scores", {})),
                baseline=u.get(BASELINE_ATTR),
                coefficients=u.get("coefficients", {}),
                suites=u.get("suites", {}),
                holdout=attrs.get(f"{HOLDOUT_TRIAL}{t.number}"),
                seconds=dict(u.get("seconds", {})),
            )
        )
    return out


def dominates(a: Mapping[str, float], b: Mapping[str, float], directions: Mapping[str, str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    better = False
    for name, d in directions.items():
        x, y = (a[name], b[name]) if d == "maximize" else (-a[name], -b[name])
        if x < y:
            return False
        better = better or x > y
    return better


def front(rs: Sequence[TrialRecord], directions: Mapping[str, str]) -> list[TrialRecord]:
    """The non-dominated records (feasible ones only, when any is feasible), by trial number.

    Trials with identical scores are all kept (both are on the front)."""
    scored = [r for r in rs if all(n in r.scores and not math.isnan(r.scores[n]) for n in directions)]
    pool = [r for r in scored if r.feasible] or scored
    return [r for r in pool if not any(dominates(o.scores, r.scores, directions) for o in pool)]


def _named(directions: Mapping[str, str], name: str, index: int) -> str:
    names = list(directions)
    if name in directions:
        return name
    return names[min(index, len(names) - 1)]


def _key(r: TrialRecord, directions: Mapping[str, str], first: str) -> tuple:
    sign = {n: 1.0 if d == "maximize" else -1.0 for n, d in directions.items()}
    order = [first, *(n for n in directions if n != first)]
    return (*(sign[n] * r.scores[n] for n in order), -r.number)


def knee(fr: Sequence[TrialRecord], directions: Mapping[str, str]) -> TrialRecord:
    """The front's record closest to the ideal point, every objective scaled to [0, 1] over the front."""
    lo = {n: min(r.scores[n] for r in fr) for n in directions}
    hi = {n: max(r.scores[n] for r in fr) for n in directions}

    def gap(r: TrialRecord) -> float:
        total = 0.0
        for n, d in directions.items():
            span = hi[n] - lo[n]
            if span <= 0:
                continue
            x = (r.scores[n] - lo[n]) / span
            total += (1 - x) ** 2 if d == "maximize" else x**2
        return total

    return min(fr, key=lambda r: (gap(r), r.number))


def pick(rs: Sequence[TrialRecord], directions: Mapping[str, str], how: str) -> TrialRecord:
    fr = front(rs, directions)
    if not fr:
        raise UserError("the study has no completed trial with scores to pick from")
    if how == "knee":
        return knee(fr, directions)
    if how == "max-safety":
        first = _named(directions, "safety", 0)
    elif how == "max-medical":
        first = _named(directions, "medical", 1)
    else:
        raise UserError(f"--pick: unknown pick {how!r} (choose from {', '.join(PICKS)})")
    return max(fr, key=lambda r: _key(r, directions, first))


def best_baseline(rs: Sequence[TrialRecord], directions: Mapping[str, str], prefix: str = "lambda=") -> list[TrialRecord]:
    """The non-dominated baselines whose label starts with ``prefix`` (the global-lambda grid's best)."""
    grid = [r for r in rs if r.baseline and r.baseline.startswith(prefix)]
    return front(grid, directions) if grid else []


def front_covers(fr: Sequence[TrialRecord], baseline: TrialRecord, directions: Mapping[str, str]) -> bool:
    """Does some front record dominate or equal ``baseline`` on every objective?"""
    def at_least(a: TrialRecord) -> bool:
        return all(
            (a.scores[n] >= baseline.scores[n]) if d == "maximize" else (a.scores[n] <= baseline.scores[n])
            for n, d in directions.items()
        )

    return any(at_least(a) for a in fr)
