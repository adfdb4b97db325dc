"""Where a study's own numbers would mislead a user, each said in one line beside them.

A study can look like it worked when it did not. Tried on a real model, three studies had every front
trial at safety 0.000, and ``run``, ``pareto`` and ``export --pick knee`` showed and exported one without a
word; on holdout a global-lambda baseline dominated every searched trial, and ``validate`` did not say so.
These checks read what the study stored (search scores, the items each rate rests on, holdout scores) and
say what is wrong:

* :func:`no_safety_gain`: no trial of the front is safer than the anchor beyond noise (the anchor is the
  ``zero`` baseline, its very weights); without that baseline, a front whose safety is 0 throughout;
* :func:`knee_like_anchor`: the knee differs from the anchor by no more than noise on every objective;
* :func:`dominating_baselines`: on holdout, a baseline that dominates every searched trial of the front;
* :func:`few_items`: an objective that rests on so few items that its interval is wide (the tables then
  show each score's interval, :func:`with_interval`).

"Beyond noise" is the plain test of two one-sided Wilson bounds at :data:`CONFIDENCE`: a rate ``b`` is
above ``a`` when ``b``'s lower bound is above ``a``'s upper bound (conservative: overlapping intervals can
hide a real difference; these are warnings, and the figures are printed with them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from safesearch.pareto import TrialRecord, dominates, front, knee, on_holdout
from safesearch.rates import lower_bound, upper_bound

if TYPE_CHECKING:
    from safesearch.studyspec import Constraint, Objective, StudySpec

CONFIDENCE = 0.9
# A rate on fewer items than this has a 90% interval wider than about +-0.08 (at a rate of 0.5).
FEW_ITEMS = 100


def items_judged(x: Objective | Constraint, suites: Mapping[str, Mapping[str, Any]], holdout: bool = False) -> float:
    """How many judged items the pooled score of ``x`` rests on, from a record's stored suite metrics
    (as :func:`safesearch.search.pooled_n` counts them: n less the unjudged, over suites that gave a value)."""
    from safesearch.search import task_key

    total = 0.0
    for ref in x.holdout if holdout else x.suites:
        m = suites.get(task_key(ref), {})
        n = float(m.get("n") or 0) - float(m.get("n_unjudged") or 0)
        if m.get(x.metric) is not None and n > 0:
            total += n
    return total


def interval(rate: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two one-sided Wilson bounds of ``rate`` on ``n`` items (nan where nothing was judged)."""
    return lower_bound(rate, n, confidence), upper_bound(rate, n, confidence)


def with_interval(rate: float, n: float, confidence: float = CONFIDENCE) -> str:
    """``0.750 (0.56-0.88, n 12)``: a rate with its interval and the items it rests on."""
    if math.isnan(rate) or n <= 0:
        return "-"
    lo, hi = interval(rate, n, confidence)
    return f"{rate:.3f} ({lo:.2f}-{hi:.2f}, n {n:g})"


def above(b: float, nb: float, a: float, na: float, confidence: float = CONFIDENCE) -> bool:
    """``b`` is above ``a`` beyond noise: ``b``'s lower bound above ``a``'s upper bound."""
    return lower_bound(b, nb, confidence) > upper_bound(a, na, confidence)


def safety_objective(spec: StudySpec) -> Objective:
    """The objective named ``safety``, else the first maximised one (the spec's safety by convention)."""
    by_name = {o.name: o for o in spec.objectives}
    return by_name.get("safety") or next((o for o in spec.objectives if o.direction == "maximize"), spec.objectives[0])


def anchor_record(rs: Sequence[TrialRecord]) -> TrialRecord | None:
    """The ``zero`` baseline: the anchor's own weights, scored as a trial."""
    return next((r for r in rs if r.baseline == "zero"), None)


def _suites(r: TrialRecord, holdout: bool) -> Mapping[str, Mapping[str, Any]]:
    """The suite metrics a record's scores come from: the search split's, or validate's holdout ones."""
    return (r.holdout or {}).get("suites", {}) if holdout else r.suites


def _directions(spec: StudySpec) -> dict[str, str]:
    return spec.objective_directions


def no_safety_gain(spec: StudySpec, rs: Sequence[TrialRecord]) -> str | None:
    """Why the front is no safer than the anchor on the search split, or None when it is (or no front)."""
    fr = front(rs, _directions(spec))
    if not fr:
        return None
    o = safety_objective(spec)
    best = max(fr, key=lambda r: (r.scores.get(o.name, -math.inf), -r.number))
    rate, n = best.scores.get(o.name, math.nan), items_judged(o, best.suites)
    anchor = anchor_record(rs)
    if anchor is None:
        if all(r.scores.get(o.name) == 0 for r in fr):
            return (f"every trial of the front scores {o.name} 0.000 on the search split: the search found no "
                    "safer point (no zero baseline was run to show the anchor's own score)")
        return None
    a_rate, a_n = anchor.scores.get(o.name, math.nan), items_judged(o, anchor.suites)
    if math.isnan(rate) or math.isnan(a_rate) or above(rate, n, a_rate, a_n):
        return None
    if best.number == anchor.number or rate <= a_rate:
        return (f"no trial of the front is safer than the anchor on the search split: best {o.name} "
                f"{with_interval(rate, n)} (trial {best.number}), the anchor's (baseline zero, trial "
                f"{anchor.number}) {with_interval(a_rate, a_n)}")
    return (f"the front's best {o.name}, {with_interval(rate, n)} (trial {best.number}), is within noise of the "
            f"anchor's {with_interval(a_rate, a_n)} (baseline zero, trial {anchor.number}) on the search split: "
            f"no safety gain shown at {CONFIDENCE:.0%} confidence")


def knee_like_anchor(spec: StudySpec, rs: Sequence[TrialRecord], knee_number: int | None = None,
                     split: str = "search") -> str | None:
    """Why the knee is the anchor within noise (on every objective), or None. ``rs`` are records as the
    picks read them (holdout scores in place once validated: ``split`` says which)."""
    anchor = anchor_record(rs)
    directions = _directions(spec)
    fr = front(rs, directions)
    if anchor is None or not fr:
        return None
    k = next((r for r in rs if r.number == knee_number), None) if knee_number is not None else knee(fr, directions)
    if k is None:
        return None
    holdout = split == "holdout"
    for o in spec.objectives:
        kr, ar = k.scores.get(o.name, math.nan), anchor.scores.get(o.name, math.nan)
        kn, an = items_judged(o, _suites(k, holdout), holdout), items_judged(o, _suites(anchor, holdout), holdout)
        if math.isnan(kr) or math.isnan(ar) or above(kr, kn, ar, an) or above(ar, an, kr, kn):
            return None
    if k.number == anchor.number:
        return f"the knee is the anchor itself (baseline zero, trial {anchor.number}) on the {split} split"
    shown = ", ".join(f"{o.name} {k.scores[o.name]:.3f} vs {anchor.scores[o.name]:.3f}" for o in spec.objectives)
    return (f"the knee (trial {k.number}) is the anchor (baseline zero, trial {anchor.number}) within noise on "
            f"the {split} split ({shown}; every difference inside the {CONFIDENCE:.0%} intervals)")


def dominating_baselines(spec: StudySpec, rs: Sequence[TrialRecord]) -> list[tuple[TrialRecord, list[int]]]:
    """On holdout: each validated baseline that dominates every validated searched trial of the search
    front (and meets the constraints there), with the numbers of those trials."""
    directions = _directions(spec)
    searched = [r for r in front(rs, directions) if not r.baseline and r.holdout]
    if not searched:
        return []
    theirs = [on_holdout(r) for r in searched]
    out = []
    for b in rs:
        if not b.baseline or not b.holdout:
            continue
        hb = on_holdout(b)
        if hb.feasible and all(n in hb.scores for n in directions) and all(
                dominates(hb.scores, t.scores, directions) for t in theirs):
            out.append((b, [t.number for t in theirs]))
    return out


def dominating_lines(spec: StudySpec, rs: Sequence[TrialRecord]) -> list[str]:
    def scores(r: TrialRecord) -> str:
        return ", ".join(f"{n} {v:.3f}" for n, v in on_holdout(r).scores.items())

    return [f"baseline {b.baseline} (trial {b.number}; {scores(b)}) dominates every searched trial of the front "
            f"on holdout (trials {', '.join(map(str, numbers))}): the search found nothing better than it"
            for b, numbers in dominating_baselines(spec, rs)]


def few_items(spec: StudySpec, rs: Sequence[TrialRecord], limit: int = FEW_ITEMS) -> list[str]:
    """The objectives whose search-split score rests on fewer than ``limit`` judged items (read from the
    front's trials): how wide a rate's interval is there."""
    fr = front(rs, _directions(spec)) or list(rs)
    out = []
    for o in spec.objectives:
        ns = [items_judged(o, r.suites) for r in fr]
        n = min((x for x in ns if x > 0), default=0)
        if 0 < n < limit:
            lo, hi = interval(0.5, n)
            out.append(f"{o.name} on the search split rests on {n:g} items: a rate there is known to about "
                       f"+-{(hi - lo) / 2:.2f} (one-sided {CONFIDENCE:.0%} bounds, at a rate of 0.5); the tables show each "
                       "score's interval")
    return out


def study_caveats(spec: StudySpec, rs: Sequence[TrialRecord], *, knee_number: int | None = None,
                  split: str = "search", picked: Sequence[TrialRecord] | None = None) -> list[str]:
    """Every caveat for a study's completed records ``rs`` (search scores), one line each. ``picked`` are
    the records the picks were made from (holdout scores in place when ``split`` is holdout)."""
    out = [line for line in (no_safety_gain(spec, rs),) if line]
    knee_line = knee_like_anchor(spec, list(picked) if picked is not None else rs, knee_number, split)
    if knee_line:
        out.append(knee_line)
    out += dominating_lines(spec, rs)
    out += few_items(spec, rs)
    return out
