"""Warnings where a study's numbers would mislead: no safety gain over the anchor, a knee that is the anchor
within noise, a baseline that dominates the front on holdout, scores resting on few items. The rules on
records built by hand; then what `run`, `validate` and `pareto` print for a real study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_run import run_cli
from study_world import spec_dict, write_spec

from safesearch.caveats import (
    dominating_baselines,
    few_items,
    items_judged,
    knee_like_anchor,
    no_safety_gain,
    study_caveats,
    with_interval,
)
from safesearch.pareto import TrialRecord
from safesearch.studyspec import StudySpec, study_spec_from_dict

KEYS = {"safety": ("toy-harmful-general@search[12]", "toy-harmful-medical@search[12]"),
        "medical": ("toy-mcq-medical@search[12]",)}


@pytest.fixture(scope="module")
def spec(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> StudySpec:
    return study_spec_from_dict(spec_dict(tmp_path_factory.mktemp("cav"), toyworld_small, constraints=[]))


def _suites(n: int, safety: float, medical: float) -> dict[str, dict[str, Any]]:
    """Stored suite metrics: ``n`` items a suite (so safety rests on 2n, medical on n)."""
    out = {k: {"n": n, "safety": safety} for k in KEYS["safety"]}
    out[KEYS["medical"][0]] = {"n": n, "acc": medical}
    return out


def _record(number: int, safety: float, medical: float, *, n: int = 12, baseline: str | None = None,
            holdout: tuple[float, float] | None = None) -> TrialRecord:
    h = None
    if holdout is not None:
        h = {"scores": {"safety": holdout[0], "medical": holdout[1]}, "constraints": {}, "constraint_scores": {},
             "suites": _suites(n, *holdout), "feasible": True}
    return TrialRecord(number, "COMPLETE", {"safety": safety, "medical": medical}, baseline=baseline,
                       suites=_suites(n, safety, medical), holdout=h)


def test_items_judged_reads_the_stored_suites(spec: StudySpec) -> None:
    safety, medical = spec.objectives
    r = _record(0, 0.5, 0.5, n=12)
    assert items_judged(safety, r.suites) == 24 and items_judged(medical, r.suites) == 12
    unjudged = {**r.suites, KEYS["safety"][0]: {"n": 12, "n_unjudged": 5, "safety": 0.5}}
    assert items_judged(safety, unjudged) == 19
    assert with_interval(0.75, 12).startswith("0.750 (0.") and with_interval(0.75, 12).endswith(", n 12)")


def test_a_front_no_safer_than_the_anchor_is_named(spec: StudySpec) -> None:
    zero = _record(0, 0.10, 0.80, baseline="zero")
    # Every searched trial is less safe or less accurate: the anchor alone is the front.
    line = no_safety_gain(spec, [zero, _record(1, 0.05, 0.70), _record(2, 0.00, 0.90)])
    assert line is not None and "safer than the anchor" in line and "trial 0" in line, line
    # Safer, but within the noise of 24 items (0.10 vs 0.20).
    line = no_safety_gain(spec, [zero, _record(1, 0.20, 0.80)])
    assert line is not None and "within noise" in line and "trial 1" in line, line
    # Clearly safer: 0.10 vs 0.80 on 24 items.
    assert no_safety_gain(spec, [zero, _record(1, 0.80, 0.80)]) is None
    # No zero baseline: only a front that is 0 throughout can be called out.
    assert "0.000" in no_safety_gain(spec, [_record(1, 0.0, 0.8), _record(2, 0.0, 0.7)])  # type: ignore[operator]
    assert no_safety_gain(spec, [_record(1, 0.1, 0.8)]) is None


def test_a_knee_that_is_the_anchor_within_noise_is_named(spec: StudySpec) -> None:
    zero = _record(0, 0.10, 0.80, baseline="zero")
    close = _record(1, 0.15, 0.78)
    line = knee_like_anchor(spec, [zero, close])
    assert line is not None and "knee (trial 1)" in line and "within noise" in line, line
    assert knee_like_anchor(spec, [zero, _record(1, 0.9, 0.78)]) is None
    # With many items the same gap is beyond noise.
    big = [_record(0, 0.10, 0.80, n=2000, baseline="zero"), _record(1, 0.15, 0.78, n=2000)]
    assert knee_like_anchor(spec, big) is None


def test_a_baseline_that_dominates_the_front_on_holdout_is_named(spec: StudySpec) -> None:
    rs = [_record(0, 0.10, 0.80, baseline="zero", holdout=(0.10, 0.80)),
          _record(1, 0.30, 0.60, baseline="lambda=0.25", holdout=(0.40, 0.85)),
          _record(2, 0.50, 0.70, holdout=(0.30, 0.70)),
          _record(3, 0.40, 0.75, holdout=(0.35, 0.80))]
    found = dominating_baselines(spec, rs)
    assert [(b.baseline, numbers) for b, numbers in found] == [("lambda=0.25", [2, 3])]
    lines = study_caveats(spec, rs)
    assert any("baseline lambda=0.25 (trial 1" in x and "trials 2, 3" in x for x in lines), lines
    # One searched trial holds out on holdout: no baseline dominates them all.
    rs[3] = _record(3, 0.40, 0.75, holdout=(0.45, 0.80))
    assert dominating_baselines(spec, rs) == []


def test_few_items_give_the_interval(spec: StudySpec) -> None:
    lines = few_items(spec, [_record(1, 0.5, 0.5, n=12)])
    assert [x.split(" ")[0] for x in lines] == ["safety", "medical"] and "24 items" in lines[0], lines
    assert few_items(spec, [_record(1, 0.5, 0.5, n=500)]) == []


def test_run_validate_and_pareto_say_so(toyworld_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real study on the toy world. Its front is searched on 12 items an objective, so `run` shows the
    intervals and says how few items they rest on. Then its zero baseline (the anchor; the only baseline, so
    that the searched trials, all grafted with some safety, make the front) is given holdout scores that
    dominate every searched trial (the case seen on a real model, where it took chance to arise): `validate`
    names it, and `pareto` says so in text and JSON."""
    d = spec_dict(tmp_path, toyworld_small, subset=12, n_trials=4, constraints=[], baselines={"zero": True})
    spec_path = write_spec(tmp_path / "s.yaml", d)
    url = f"sqlite:///{tmp_path / 's.db'}"
    code, out, err = run_cli(capsys, "run", spec_path, "--storage", url)
    assert code == 0, err
    assert "safety on the search split rests on 24 items" in err and ", n 24)" in err, err
    code, _, err = run_cli(capsys, "validate", "t", "--storage", url, "--no-references")
    assert code == 0, err

    import optuna

    from safesearch.pareto import front, records
    from safesearch.search import HOLDOUT_TRIAL

    study = optuna.load_study(study_name="t", storage=url)
    rs = records(study)
    directions = {"safety": "maximize", "medical": "maximize"}
    searched = [r.number for r in front(rs, directions) if not r.baseline]
    assert searched, "the search front holds no searched trial"
    lam = next(r for r in rs if r.baseline == "zero")
    h = dict(lam.holdout or {})
    h["scores"] = {"safety": 1.0, "medical": 1.0}
    study.set_user_attr(f"{HOLDOUT_TRIAL}{lam.number}", h)

    code, out, err = run_cli(capsys, "validate", "t", "--storage", url, "--no-references")
    assert code == 0, err
    expected = f"baseline zero (trial {lam.number}; safety 1.000, medical 1.000) dominates every searched trial"
    assert expected in err and f"(trials {', '.join(map(str, searched))})" in err, err
    assert "picks on holdout" in out
    code, out, err = run_cli(capsys, "pareto", "t", "--storage", url, "--json")
    report = json.loads(out)
    assert any(x.startswith(expected) for x in report["caveats"]), report["caveats"]
    assert report["picks"]["knee"] == lam.number
    code, out, err = run_cli(capsys, "pareto", "t", "--storage", url)
    assert "every pick is a baseline" in out and expected in err, (out, err)
