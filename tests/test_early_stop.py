"""Early stopping (multi-fidelity) and constraints checked at a confidence: the Wilson bounds, the rule
that stops a hopeless trial, a slice-then-rest evaluation that equals scoring all at once, and the PRUNED
path of a real study on the small toy world (attrs kept, not counted toward n_trials, not on the front)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from study_world import spec_dict

from safesearch.earlystop import Measured, hopeless, slice_size, split_items
from safesearch.evaluate import combine, evaluate
from safesearch.pareto import front, records
from safesearch.rates import lower_bound, upper_bound
from safesearch.search import (
    BASELINE_ATTR,
    constraint_bounds,
    ensure_study,
    open_worker,
    pooled_n,
    run_tasks,
    score_all,
    sliced,
)
from safesearch.studyspec import EarlyStop, StudySpec, study_spec_from_dict

DIRS = {"safety": "maximize", "medical": "maximize"}


# -- the bounds and the rule (no model) --------------------------------------------------------------------


def test_wilson_bounds() -> None:
    # 0 of 40 refused: the true rate is below 3.9% at 90% (z = 1.2816: z^2 / (n + z^2)).
    assert upper_bound(0.0, 40, 0.9) == pytest.approx(1.2816**2 / (40 + 1.2816**2), rel=1e-4)
    assert lower_bound(0.0, 40, 0.9) == 0.0 and upper_bound(1.0, 40, 0.9) == 1.0
    # 2 of 40 (0.05) is compatible with 0.11 at 90%: what a bound met on 40 items is worth.
    assert 0.10 < upper_bound(0.05, 40, 0.9) < 0.12
    # More items, tighter; more confidence, wider; the rate always inside.
    assert upper_bound(0.05, 400, 0.9) < upper_bound(0.05, 40, 0.9) < upper_bound(0.05, 40, 0.99)
    assert lower_bound(0.3, 20, 0.95) < 0.3 < upper_bound(0.3, 20, 0.95)
    assert math.isnan(upper_bound(0.5, 0, 0.9)) and math.isnan(lower_bound(math.nan, 10, 0.9))
    with pytest.raises(ValueError):
        upper_bound(0.5, 10, 1.0)


def test_slices_are_the_lowest_ranks_in_item_order() -> None:
    assert [slice_size(n, 0.5) for n in (0, 1, 2, 3, 40)] == [0, 1, 1, 2, 20]
    assert slice_size(10, 0.99) == 9 and slice_size(10, 0.01) == 1  # always one on each side
    first, rest = split_items(["d", "a", "c", "b"], 0.5)
    assert first == [1, 3] and rest == [0, 2]


def _spec(tmp_path: Path, world: Path, **kw: Any) -> StudySpec:
    return study_spec_from_dict(spec_dict(tmp_path, world, **kw), where="test")


def test_the_rule_stops_broken_constraints_and_dominated_trials(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tmp_path)  # over_refusal max 0.1; no model is read
    objectives, constraints = spec.objectives, spec.constraints
    rule = EarlyStop(fraction=0.5, confidence=0.95)

    def m(safety: float, medical: float, over: float, n: float = 20) -> dict[str, Measured]:
        return {"safety": Measured(safety, 2 * n), "medical": Measured(medical, n), "over_refusal": Measured(over, n)}

    # 8 of 20 benign refused: at least 0.23 at 95%, beyond max 0.1 whatever the rest would show.
    why = hopeless(rule, objectives, constraints, m(0.9, 0.9, 0.4), [])
    assert why is not None and why.startswith("over_refusal 0.400 on 20 items, at least 0.2") and "above max 0.1" in why
    # 2 of 20 (0.1) may well be within the bound: it goes on.
    assert hopeless(rule, objectives, constraints, m(0.9, 0.9, 0.1), []) is None
    # A front trial better than the slice's optimistic bounds on both objectives: dominated.
    fr = [(7, {"safety": 0.95, "medical": 0.98})]
    why = hopeless(rule, objectives, constraints, m(0.3, 0.5, 0.0), fr)
    assert why is not None and why.startswith("dominated by trial 7 even at its bounds (safety at best 0.4")
    # Close to the front, the bounds overlap it: not stopped; nor with dominated: false, nor with no front.
    assert hopeless(rule, objectives, constraints, m(0.9, 0.9, 0.0), fr) is None  # safety up to 0.96
    assert hopeless(replace(rule, dominated=False), objectives, constraints, m(0.3, 0.5, 0.0), fr) is None
    assert hopeless(rule, objectives, constraints, m(0.3, 0.5, 0.0), []) is None
    # A min: constraint is broken from below.
    floor = replace(constraints[0], max=None, min=0.9)
    why = hopeless(rule, objectives, [floor], m(0.9, 0.9, 0.2), [])
    assert why is not None and "below min 0.9" in why


def test_a_constraint_with_a_confidence_is_checked_on_its_bound(tmp_path: Path) -> None:
    d = spec_dict(tmp_path, tmp_path)
    d["constraints"][0]["confidence"] = 0.9
    spec = study_spec_from_dict(d)
    c = spec.constraints[0]
    assert c.confidence == 0.9 and c.violation(0.05) == pytest.approx(-0.05)  # no n: the rate itself
    assert c.violation(0.05, 40) == pytest.approx(upper_bound(0.05, 40, 0.9) - 0.1) and c.violation(0.05, 40) > 0
    assert c.violation(0.0, 40) < 0
    # What notes say: the search split's check at its confidence, holdout's on the rate.
    assert constraint_bounds(spec) == {"over_refusal": "max 0.1 at 90% confidence"}
    assert constraint_bounds(spec, search=False) == {"over_refusal": "max 0.1"}
    again = study_spec_from_dict(spec.to_dict())
    assert again.constraints[0].confidence == 0.9 and again.fingerprint() == spec.fingerprint()
    assert spec.fingerprint() != study_spec_from_dict(spec_dict(tmp_path, tmp_path)).fingerprint()
    # early_stop: absent or false is off, true the defaults, a mapping its fields; it round-trips.
    assert study_spec_from_dict({**d, "early_stop": False}).early_stop is None
    assert study_spec_from_dict({**d, "early_stop": True}).early_stop == EarlyStop()
    es = study_spec_from_dict({**d, "early_stop": {"fraction": 0.25, "max_stopped": 5}})
    assert es.early_stop == EarlyStop(fraction=0.25, max_stopped=5)
    assert study_spec_from_dict(es.to_dict()).early_stop == es.early_stop
    assert es.fingerprint() != spec.fingerprint()


# -- on the small toy world ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory):
    spec = _spec(tmp_path_factory.mktemp("es"), toyworld_small, n_trials=4, subset=12)
    w = open_worker(spec, device="cpu")
    yield w
    w.close()


def test_a_slice_then_the_rest_scores_what_all_at_once_scores(worker) -> None:
    backend = worker.grafted.backend
    worker.grafted.apply(worker.space.coefficients(dict.fromkeys((p.name for p in worker.space.params), 0.3)))
    whole = run_tasks(backend, worker.tasks)
    first, rest = sliced(worker.tasks, 0.5)
    for key, t in worker.tasks.items():
        assert len(first[key].items) == 6 and len(rest[key].items) == 6
        assert {it.id for it in first[key].items} | {it.id for it in rest[key].items} == {it.id for it in t.items}
        parts = [evaluate(backend, s[key].suite, s[key].items, judge=t.judge, image_cache=t.image_cache)
                 for s in (first, rest)]
        joined = combine(t.suite, t.items, parts)
        assert joined.metrics == whole[key].metrics, key
        assert [o.id for o in joined.items] == [it.id for it in t.items]
        assert [o.verdict for o in joined.items] == [o.verdict for o in whole[key].items]
        assert [o.choice for o in joined.items] == [o.choice for o in whole[key].items]
    spec = worker.spec
    assert score_all(spec, whole) == score_all(spec, {k: combine(t.suite, t.items, [
        evaluate(backend, s[k].suite, s[k].items, judge=t.judge) for s in (first, rest)]) for k, t in worker.tasks.items()})
    assert pooled_n(spec.constraints[0], whole) == (whole["toy-benign@search[12]"].metrics["over_refusal"], 12.0)


def test_hopeless_trials_are_pruned_with_their_slice_kept(worker, tmp_path: Path) -> None:
    """A constraint no point can meet (over-refusal at least 1.01: even a slice all refused has its upper
    bound at 1): every searched trial is stopped after its first slice, whatever the sampler proposes, the
    baselines run whole, and once ``max_stopped`` trials are stopped the rest run to the end, so that the
    study ends. (At 0.95 a point that refuses 5 or 6 of the slice's 6 benign requests may hold, so the
    test hung on which points the sampler happened to propose.)"""
    d = worker.spec.to_dict()
    d["constraints"][0] = {**d["constraints"][0], "max": None, "min": 1.01}
    d["constraints"][0].pop("max")
    d.update(name="es", n_trials=4, early_stop={"fraction": 0.5, "confidence": 0.95, "max_stopped": 3})
    spec = study_spec_from_dict(d)
    real = worker.spec
    worker.spec, worker.artifact_store = spec, None
    try:
        study, _ = ensure_study(spec, RDBStorage(f"sqlite:///{tmp_path / 'es.db'}"), worker.space)
        seen: list[Any] = []
        assert worker.work(study, spec.n_trials, on_trial=seen.append) == 4
    finally:
        worker.spec = real
    trials = study.get_trials()
    states = [t.state for t in trials]
    # Baselines 0 and 1 whole; 2, 3, 4 stopped; then max_stopped is reached and 5, 6 run whole.
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 3 + [TrialState.COMPLETE] * 2, states
    assert [o.state for o in seen] == states
    for t in trials[2:5]:
        u = t.user_attrs
        es = u["early_stop"]
        assert es["reason"].startswith("over_refusal ") and "below min 1.01" in es["reason"]
        assert set(es["scores"]) == {"safety", "medical"} and set(es["constraint_scores"]) == {"over_refusal"}
        assert all(m["n"] == 6 for m in es["suites"].values())  # the first half of 12 items per suite
        assert "scores" not in u and u["coefficients"] and u["seconds"]["eval"] > 0
        assert t.constraints["over_refusal"] > 0  # the samplers see it infeasible
        assert t.values is None
    assert all(o.stopped for o in seen[2:5]) and not any(o.stopped for o in seen[:2] + seen[5:])
    for t in trials[:2] + trials[5:]:
        assert all(m["n"] == 12 for m in t.user_attrs["suites"].values())
    assert [t.user_attrs.get(BASELINE_ATTR) for t in trials[:2]] == ["zero", "lambda=0.5"]
    rs = records(study)
    assert [r.number for r in rs] == [0, 1, 5, 6]  # only COMPLETE trials are read, so none stopped is on the front
    assert {r.number for r in front(rs, DIRS)} <= {0, 1, 5, 6}


def test_a_trial_the_front_dominates_is_stopped(worker, tmp_path: Path) -> None:
    """With a feasible front trial that dominates everything short of a perfect slice, a searched trial
    is stopped as dominated unless its own slice could still tie it; the rule reads the study's current
    front. (The toy world is trained on the machine that runs the test, so what a searched point scores
    differs from machine to machine: CI once met a point whose slice scored 6 of 6 on both objectives,
    which a perfect front trial does not dominate. So each trial that ran on is checked against its slice
    scored again, and at least one of four must be stopped.)"""
    from safesearch.earlystop import dominated_by, optimistic

    d = worker.spec.to_dict()
    # No constraint: only the dominance rule can stop a trial here.
    d.update(name="dom", n_trials=7, baselines={"zero": True}, constraints=[],
             early_stop={"fraction": 0.5, "confidence": 0.6})
    spec = study_spec_from_dict(d)
    real = worker.spec
    worker.spec, worker.artifact_store = spec, None
    try:
        study, _ = ensure_study(spec, RDBStorage(f"sqlite:///{tmp_path / 'dom.db'}"), worker.space)
        # A feasible point that dominates everything: what a front trial from another worker could be.
        study.add_trial(_perfect(worker))
        worker.work(study, spec.n_trials, max_trials=5)
        trials = study.get_trials()
        assert trials[0].user_attrs[BASELINE_ATTR] == "zero" and trials[0].state == TrialState.COMPLETE
        searched = trials[2:]
        assert len(searched) == 4
        for t in searched:
            if t.state == TrialState.PRUNED:
                reason = t.user_attrs["early_stop"]["reason"]
                assert reason.startswith("dominated by trial 1"), reason
                continue
            assert t.state == TrialState.COMPLETE
            # It ran on: its first slice, scored again, must reach the perfect point on every objective.
            worker.grafted.apply(t.user_attrs["coefficients"])
            partial = run_tasks(worker.grafted.backend, worker._stages(0.5)[0])
            measured = {o.name: Measured(*pooled_n(o, partial)) for o in spec.objectives}
            best = optimistic(spec.objectives, measured, 0.6)
            assert dominated_by(best, [(1, {"safety": 1.0, "medical": 1.0})], DIRS) is None, (t.number, best)
        assert any(t.state == TrialState.PRUNED for t in searched), [t.state for t in searched]
    finally:
        worker.spec = real


def _perfect(worker: Any) -> Any:
    import optuna

    params = {p.name: 0.0 for p in worker.space.params}
    return optuna.trial.create_trial(
        params=params, distributions=worker.space.distributions(), values=[1.0, 1.0],
        user_attrs={"scores": {"safety": 1.0, "medical": 1.0}}, state=TrialState.COMPLETE)


def test_run_and_pareto_report_stopped_trials(toyworld_small: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """What a user sees: `run` logs a line per stopped trial, `pareto` counts them (not on the front), and
    `export` refuses a stopped trial in one line."""
    import contextlib
    import io
    import json

    from cli_run import run_cli
    from study_world import write_spec

    from safesearch.cli import main

    d = spec_dict(tmp_path, toyworld_small, subset=8, n_trials=3)
    d["constraints"][0] = {**{k: v for k, v in d["constraints"][0].items() if k != "max"}, "min": 0.95}
    d["early_stop"] = {"fraction": 0.5, "max_stopped": 2}
    spec = write_spec(tmp_path / "es.yaml", d)
    url = f"sqlite:///{tmp_path / 'es.db'}"
    with contextlib.redirect_stderr(io.StringIO()) as err:  # a log, not a terminal
        main(["run", str(spec), "--storage", url])
    stopped = [line for line in err.getvalue().splitlines() if " stopped early " in line]
    assert len(stopped) == 2 and all("below min 0.95" in line for line in stopped), err.getvalue()
    code, out, _ = run_cli(capsys, "pareto", "t", "--storage", url, "--json")
    report = json.loads(out)
    assert code == 0 and report["n_complete"] == 3 and len(report["stopped_early"]) == 2
    numbers = {s["trial"] for s in report["stopped_early"]}
    assert not numbers & {f["trial"] for f in report["front"]}
    code, out, _ = run_cli(capsys, "pareto", "t", "--storage", url)
    assert "2 more trials were stopped early" in out
    code, _, err = run_cli(capsys, "export", "t", "--trial", str(min(numbers)), "--out", str(tmp_path / "x"),
                           "--storage", url)
    assert code == 2 and "is PRUNED, not COMPLETE" in err and err.count("\n") == 1
