"""Reading a study: its trials as plain records, the Pareto front, the picks (the plot: safesearch.frontplot).

The front is computed from each trial's ``scores`` user attr (the objectives on the search split), not
from Optuna's values, so that the single-objective mode (CMA-ES on a weighted sum) has a front too. Only
feasible trials (every constraint value <= 0) compete when any trial is feasible. Baselines take part
like any trial and are marked.

Picks are made on the search split until ``safesearch validate`` has scored the whole front on holdout,
then on holdout (see :func:`pick_split`). ``max-safety`` / ``max-medical`` are the front's best trial on
the objective named ``safety`` / ``medical`` (else the first / second objective), ties broken by the
other objectives; ``knee`` is the front's trial closest to the ideal point (the front's best on every
objective), in the objectives' own units. Every objective here is a rate in [0, 1] (safety, accuracy,
over-refusal), so a point of safety weighs what a point of accuracy weighs. Rescaling each objective to
[0, 1] over the front (or over the trials searched) was tried and misleads: any two-trial front becomes a
tie, and a 2.7-point spread of MCQ accuracy came to outweigh a 63-point spread of safety (the toy demo,
seed 1, on holdout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from safesearch.errors import UserError

if TYPE_CHECKING:  # optuna loads where a study is read, not when the CLI starts
    import optuna
    from optuna.trial import TrialState

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


def records(study: optuna.Study, states: Sequence[TrialState] | None = None, *,
            holdout: bool = True) -> list[TrialRecord]:
    """The study's trials (COMPLETE by default) as records, with their holdout scores where validated
    (``holdout=False``: without, and without reading the study's attrs, where they live)."""
    from optuna.trial import TrialState

    from safesearch.dashboard import named_constraints
    from safesearch.search import BASELINE_ATTR, HOLDOUT_TRIAL

    attrs = study.user_attrs if holdout else {}
    out = []
    for t in study.get_trials(deepcopy=False, states=tuple(states or (TrialState.COMPLETE,))):
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


def candidates(rs: Sequence[TrialRecord], directions: Mapping[str, str]) -> list[TrialRecord]:
    """What the front is drawn from: the records scored on every objective, the feasible ones when any is."""
    scored = [r for r in rs if all(n in r.scores and not math.isnan(r.scores[n]) for n in directions)]
    return [r for r in scored if r.feasible] or scored


def front(rs: Sequence[TrialRecord], directions: Mapping[str, str]) -> list[TrialRecord]:
    """The non-dominated records (feasible ones only, when any is feasible), by trial number.

    Trials with identical scores are all kept (both are on the front)."""
    pool = candidates(rs, directions)
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
    """The front's record closest (Euclidean, in the objectives' own units) to the ideal point, the front's
    best on every objective; ties go to the earlier trial."""
    best = {n: (max if d == "maximize" else min)(r.scores[n] for r in fr) for n, d in directions.items()}
    return min(fr, key=lambda r: (sum((r.scores[n] - best[n]) ** 2 for n in directions), r.number))


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


def on_holdout(r: TrialRecord) -> TrialRecord:
    """``r`` as ``safesearch validate`` scored it: its holdout scores and constraints in place of the search
    split's (which the study keeps)."""
    h = r.holdout or {}
    return replace(r, scores=dict(h.get("scores", {})), constraints=dict(h.get("constraints", {})),
                   constraint_scores=dict(h.get("constraint_scores", {})))


def pick_split(rs: Sequence[TrialRecord], directions: Mapping[str, str]) -> tuple[list[TrialRecord], str]:
    """Where the picks are made: ``holdout`` once every trial of the search front is validated (the pool is
    then the validated trials, front and baselines, on their holdout scores: a search-front trial that
    breaks a constraint on holdout is no pick, and a baseline that does better there is), else ``search``
    (every completed trial, on the search split)."""
    fr = front(rs, directions)
    if fr and all(r.holdout for r in fr):
        return [on_holdout(r) for r in rs if r.holdout], "holdout"
    return list(rs), "search"


@dataclass(frozen=True)
class Picks:
    """The picks (how -> trial number), the split they were made on, and whether any trial of that split's
    pool meets the constraints (False: the picks are the least infeasible, and say so)."""

    numbers: dict[str, int]
    split: str
    feasible: bool
    baselines: dict[int, str] = field(default_factory=dict)  # picked trial -> the baseline it is

    @property
    def where(self) -> str:
        return ("on holdout (the validated trials, as validate scored them)" if self.split == "holdout"
                else "on the search split (run `safesearch validate` to pick on holdout)")

    def describe(self) -> str:
        def named(n: int) -> str:
            return f"trial {n}" + (f" (baseline {self.baselines[n]})" if n in self.baselines else "")

        line = f"picks {self.where}: " + ", ".join(f"{k} = {named(v)}" for k, v in self.numbers.items())
        if not self.feasible:
            line += f"; no trial meets the constraints on the {self.split} split: these picks break them"
        elif self.split == "holdout" and all(n in self.baselines for n in self.numbers.values()):
            line += ("; every pick is a baseline: no searched trial of the front does better on holdout "
                     "within the constraints")
        return line


def picks(rs: Sequence[TrialRecord], directions: Mapping[str, str]) -> Picks:
    """Every pick of :data:`PICKS`, made where :func:`pick_split` says."""
    pool, split = pick_split(rs, directions)
    feasible = any(r.feasible for r in candidates(pool, directions))
    chosen = {how: pick(pool, directions, how) for how in PICKS}
    return Picks({how: r.number for how, r in chosen.items()}, split, feasible,
                 {r.number: r.baseline for r in chosen.values() if r.baseline})


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
