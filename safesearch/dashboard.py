"""What optuna-dashboard shows of a study: objective names, feasibility, and each trial's story.

optuna-dashboard reads a study through Optuna's storage, so what it shows is what the study stores:

- the objective names (``study.set_metric_names``), so that its plots and tables read "safety" and
  "medical" rather than "0" and "1" (for ``cmaes-weighted``, the one value is ``weighted_sum``);
- each trial's constraint values where every dashboard reads them: the system attr ``constraints`` as
  the list Optuna 3 stored (optuna-dashboard 0.21 reads only that; Optuna 5 reads it too, as
  constraints named "0", "1", ...), beside Optuna 5's per-name ``constraints:<name>`` that samplers read;
- a trial note (``optuna_dashboard.save_note``, Markdown): the baseline it is, its scores per suite on
  the search split (and on holdout once ``safesearch validate`` has scored it), the coefficients as a
  table, and a few sample exchanges; the study note holds ``validate``'s holdout table.

optuna-dashboard 0.21 computes its "best trials" (and marks the Pareto front) from the values alone,
feasible or not. :func:`feasible_front_patch` makes the ``safesearch dashboard`` server compute them
from the feasible trials, as ``safesearch pareto`` does, where the installed dashboard does not already.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

# The system attr optuna-dashboard (and Optuna 3) reads a trial's constraints from: a list, <= 0 feasible.
CONSTRAINTS_LIST_KEY = "constraints"
HOLDOUT_HEADING = "### Holdout split"
SAMPLES_PER_SUITE = 2
_CELL = 90  # characters of a prompt or response shown in a note (the page is read without scrolling sideways)


def metric_names(objective_names: Sequence[str], single_objective: bool) -> list[str]:
    """The names of Optuna's values: the objectives, or the weighted sum CMA-ES maximises."""
    return ["weighted_sum"] if single_objective else list(objective_names)


def record_constraint_list(trial: optuna.Trial, violations: Sequence[float]) -> None:
    """The trial's constraint values as the list optuna-dashboard reads (in the spec's order)."""
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_LIST_KEY, [float(v) for v in violations])


def named_constraints(constraints: Mapping[str, float]) -> dict[str, float]:
    """Optuna 5's view of a trial's constraints less the list entries ("0", "1", ...) it also reads."""
    named = {k: v for k, v in constraints.items() if not k.isdigit()}
    return named or dict(constraints)


# -- notes -------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "-" if x is None else str(x).lower()
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def _cell(text: Any) -> str:
    """One Markdown table cell: one line, pipes escaped, cut to a readable length."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= _CELL else s[: _CELL - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(_fmt(c)) for c in row) + " |" for row in rows),
    ]


def scores_section(title: str, scores: Mapping[str, float], constraint_scores: Mapping[str, float],
                   bounds: Mapping[str, str], suites: Mapping[str, Mapping[str, Any]],
                   feasible: bool | None) -> list[str]:
    """A heading, the objectives and constraints in one line, and a row per suite with its metrics."""
    parts = [f"**{n}** {_fmt(v)}" for n, v in scores.items()]
    parts += [f"**{n}** {_fmt(v)} ({bounds.get(n, '')})".replace(" ()", "") for n, v in constraint_scores.items()]
    lines = [title, "", " · ".join(parts) + ("" if feasible is None else f" · {'feasible' if feasible else 'INFEASIBLE'}"), ""]
    rows = []
    for key, metrics in suites.items():
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("n", "n_unjudged"))
        rows.append([key, metrics.get("n", "-"), shown])
    if rows:
        lines += _table(["suite", "n", "metrics"], rows) + [""]
    return lines


def coefficients_section(coefficients: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One row per group, one column per vector."""
    vectors = list(coefficients)
    groups = list(dict.fromkeys(g for v in vectors for g in coefficients[v]))
    rows = [[g, *(coefficients[v].get(g, 0.0) for v in vectors)] for g in groups]
    return ["### Coefficients", "", *_table(["group", *vectors], rows), ""]


def samples_section(exchanges: Sequence[Mapping[str, Any]], per_suite: int = SAMPLES_PER_SUITE) -> list[str]:
    """A few exchanges per suite: what was asked, what came back, and how it was scored; the responses
    generated to full length for reading (``judged_response`` beside them) first."""
    rows, seen = [], {}
    for e in sorted(exchanges, key=lambda e: "judged_response" not in e):  # stable: the items' order within
        key = e["suite"]
        if seen.get(key, 0) >= per_suite:
            continue
        seen[key] = seen.get(key, 0) + 1
        asked = e.get("prompt", "")
        if e.get("image"):
            asked = f"[image: {e['image']}] {asked}"
        answered = e.get("response") if e.get("response") is not None else e.get("chosen", e.get("choice"))
        scored = e.get("verdict") or ("correct" if e.get("correct") else "wrong" if "correct" in e else "")
        rows.append([key, e["id"], asked, answered, scored])
    if not rows:
        return []
    return ["### Sample exchanges", "", *_table(["suite", "item", "prompt", "response", "scored"], rows),
            "", "Every item's exchange: the trial's `responses-N.jsonl` artifact (Artifacts, below: its table "
            "button shows it).", ""]


def trial_note(number: int, baseline: str | None, search: list[str], coefficients: Mapping[str, Mapping[str, float]],
               samples: list[str], holdout: list[str] | None = None) -> str:
    """The note of a trial: heading (the baseline it is), search scores, holdout scores once validated,
    coefficients, sample exchanges."""
    title = f"## Trial {number}" + (f": baseline `{baseline}`" if baseline else "")
    what = ("A baseline, enqueued before the search: " + ("the anchor as is." if baseline == "zero" else
            "one vector at one scale on every group (RESTA-style).")) if baseline else ""
    lines = [title, "", *([what, ""] if what else []), *search, *(holdout or []), *coefficients_section(coefficients),
             *samples]
    return "\n".join(lines).rstrip() + "\n"


def with_holdout(note: str, holdout: list[str]) -> str:
    """``note`` with its holdout section replaced (or put before the coefficients)."""
    section = "\n".join(holdout).rstrip() + "\n\n"
    pattern = re.compile(rf"^{re.escape(HOLDOUT_HEADING)}\n.*?(?=^### |\Z)", re.S | re.M)
    if pattern.search(note):
        return pattern.sub(lambda _: section, note, count=1)
    at = note.find("### Coefficients")
    return note[:at] + section + note[at:] if at >= 0 else note.rstrip() + "\n\n" + section


STUDY_HOLDOUT_HEADING = "## Holdout split (safesearch validate)"


def holdout_table(rows: Sequence[tuple[str, str, Mapping[str, Any], Mapping[str, Any] | None]],
                  objectives: Sequence[str], constraints: Sequence[str]) -> list[str]:
    """The study note's section: one row per (trial, label, search record, holdout record); a checkpoint's
    row has no search record. Each score reads ``search / holdout``."""
    def both(search: Any, holdout: Any) -> str:
        return f"{_fmt(search)} / {_fmt(holdout)}"

    body = []
    for trial, label, search, holdout in rows:
        h = holdout or {}
        cells = [trial, label]
        cells += [both(search.get("scores", {}).get(n), h.get("scores", {}).get(n)) for n in objectives]
        cells += [both(search.get("constraint_scores", {}).get(c), h.get("constraint_scores", {}).get(c))
                  for c in constraints]
        cells.append("-" if not h else "yes" if h.get("feasible") else "NO")
        body.append(cells)
    header = ["trial", "", *objectives, *constraints, "feasible on holdout"]
    return [STUDY_HOLDOUT_HEADING, "", "Front trials (*), baselines and the graft's checkpoints; each score is "
            "`search / holdout` (the holdout split shares no item with the search split).", "",
            *_table(header, body), ""]


def with_study_holdout(note: str, section: Sequence[str]) -> str:
    """The study note with its holdout section replaced (or appended); what else it holds is kept."""
    text = "\n".join(section).rstrip() + "\n"
    pattern = re.compile(rf"^{re.escape(STUDY_HOLDOUT_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(note):
        return pattern.sub(lambda _: text, note, count=1)
    return (note.rstrip() + "\n\n" if note.strip() else "") + text


def save_trial_note(study: optuna.Study, trial_id: int, body: str) -> None:
    """``body`` as the note of the trial ``trial_id`` (running or finished: notes are study attrs), as
    optuna-dashboard's ``save_note`` saves it, in one transaction that reads only this note's keys
    (:func:`safesearch.batch.save_note`; the dashboard's reads every system attr of the study, twice)."""
    from safesearch.batch import save_note

    save_note(study, trial_id, body)


def trial_note_of(study: optuna.Study, trial_id: int) -> str:
    from optuna_dashboard import get_note

    return get_note(optuna.Trial(study, trial_id))


def save_study_note(study: optuna.Study, body: str) -> None:
    from safesearch.batch import save_note

    save_note(study, None, body)


def study_note_of(study: optuna.Study) -> str:
    from optuna_dashboard import get_note

    return get_note(study)


# -- the server's best trials ------------------------------------------------------------------------


def competing(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials a front is made of, as :func:`safesearch.pareto.front` picks them: the complete
    feasible ones, or every complete one when none is feasible."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return [t for t in done if all(v <= 0 for v in t.constraints.values())] or done


def _ignores_constraints(front: Any) -> bool:
    """Whether the installed dashboard's front function keeps an infeasible trial that dominates."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState, create_trial

    good = create_trial(state=TrialState.COMPLETE, values=[1.0, 1.0], system_attrs={CONSTRAINTS_LIST_KEY: [1.0]})
    fair = create_trial(state=TrialState.COMPLETE, values=[0.5, 0.5], system_attrs={CONSTRAINTS_LIST_KEY: [0.0]})
    good.number, fair.number = 0, 1
    kept = front([good, fair], [StudyDirection.MAXIMIZE] * 2)
    return any(t.number == 0 for t in kept)


def feasible_front_patch() -> bool:
    """Make optuna-dashboard's best trials the feasible front, as ``safesearch pareto`` computes it, where
    the installed dashboard ignores constraints (0.21 does; a version that filters is left as it is).
    Returns whether it patched. Applies to this process's dashboard server only."""
    from optuna_dashboard import _app

    front = getattr(_app, "get_pareto_front_trials", None)
    if front is None or getattr(front, "_safesearch_feasible", False) or not _ignores_constraints(front):
        return False

    def feasible_front(trials: Sequence[Any], directions: Sequence[Any]) -> list[Any]:
        return front(competing(trials), directions)

    feasible_front._safesearch_feasible = True  # type: ignore[attr-defined]
    _app.get_pareto_front_trials = feasible_front
    return True
