"""The search on the small toy world: spaces, baselines, trials (merge in place, scores, constraints,
artifacts), the budget, the study checks, and the front and its picks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from study_world import spec_dict

from safesearch.backends.transformers import TransformersBackend
from safesearch.errors import UserError
from safesearch.pareto import TrialRecord, best_baseline, dominates, front, front_covers, knee, pick, records
from safesearch.search import (
    BASELINE_ATTR,
    TrialFailed,
    build_space,
    ensure_study,
    groups_of,
    objective_values,
    open_worker,
    run_tasks,
    score_all,
)
from safesearch.storage import RetryTrial, artifact_store_for, open_storage, unretried_failures
from safesearch.studyspec import StudySpec, study_spec_from_dict

GROUPS = {"safety": ["embed", "layer.0", "layer.1", "norm", "head"], "medical": ["embed", "layer.0", "layer.1", "norm", "head"]}


def _spec(tmp_path: Path, world: Path, **kw: Any) -> StudySpec:
    return study_spec_from_dict(spec_dict(tmp_path, world, **kw), where="test")


# -- the search space (no model) ---------------------------------------------------------------------------


def test_independent_space_fixed_groups_and_baselines(tmp_path: Path) -> None:
    d = spec_dict(tmp_path, tmp_path)
    d["search"]["safety"]["groups"] = {"^embed$": [0.0, 0.0], "head": [0.25, 1.0]}
    d["baselines"] = {"zero": False, "global_lambda": {"vector": "safety", "values": [0.5]}}
    spec = study_spec_from_dict(d)
    active = {"safety": GROUPS["safety"], "medical": GROUPS["medical"][1:]}  # medical leaves embed alone
    space = build_space(spec, GROUPS, active)
    names = [p.name for p in space.params]
    assert "safety.embed" not in names and "medical.embed" not in names
    assert [p for p in space.params if p.name == "safety.head"][0].low == 0.25
    coefs = space.coefficients({n: 0.25 for n in names})
    assert coefs["safety"]["embed"] == 0.0 and coefs["safety"]["layer.0"] == 0.25
    assert coefs["medical"]["embed"] == 0.0 and set(coefs["medical"]) == set(GROUPS["medical"])
    ((label, lam),) = space.baseline_params(spec)
    assert label == "lambda=0.5" and lam["safety.layer.0"] == 0.5 and lam["medical.layer.0"] == 0.0
    assert lam["safety.head"] == 0.5
    # The zero baseline does not fit head's range [0.25, 1];
    with pytest.raises(UserError, match=r"baselines.zero: parameter safety.head would be 0, outside its range \[0.25, 1\]"):
        build_space(study_spec_from_dict({**d, "baselines": {"zero": True}}), GROUPS, active).baseline_params(
            study_spec_from_dict({**d, "baselines": {"zero": True}}))
    assert space.coefficients(lam)["safety"]["embed"] == 0.0  # a fixed group keeps its value


def test_scaled_space(tmp_path: Path) -> None:
    d = spec_dict(tmp_path, tmp_path)
    d["search"]["safety"] = {"scale": [0.0, 1.0], "factor": [0.5, 1.5]}
    spec = study_spec_from_dict(d)
    space = build_space(spec, GROUPS, GROUPS)
    names = {p.name for p in space.params}
    assert "safety.scale" in names and "safety.factor.layer.1" in names and "safety.layer.1" not in names
    values = {n: 1.0 for n in names} | {"safety.scale": 0.4, "safety.factor.head": 1.5}
    coefs = space.coefficients(values)
    assert coefs["safety"]["layer.0"] == pytest.approx(0.4)
    assert coefs["safety"]["head"] == pytest.approx(0.6)
    lam = dict(space.baseline_params(spec))["lambda=0.5"]
    assert space.coefficients(lam)["safety"] == dict.fromkeys(GROUPS["safety"], 0.5)


# -- the front (no model) ------------------------------------------------------------------------------


def _rec(n: int, s: float, m: float, over: float = 0.0, baseline: str | None = None) -> TrialRecord:
    return TrialRecord(n, "COMPLETE", {"safety": s, "medical": m}, {"over_refusal": over - 0.1}, {"over_refusal": over},
                       baseline=baseline)


DIRS = {"safety": "maximize", "medical": "maximize"}


def test_front_feasibility_picks_and_baselines() -> None:
    rs = [
        _rec(0, 0.0, 0.6, baseline="zero"),
        _rec(1, 0.9, 0.5, baseline="lambda=0.5"),
        _rec(2, 1.0, 0.55, over=0.8, baseline="lambda=1"),  # best scores, but infeasible
        _rec(3, 0.95, 0.52),
        _rec(4, 0.5, 0.58),
        _rec(5, 0.4, 0.57),  # dominated by 4
        _rec(6, 0.95, 0.52),  # ties with 3: both on the front
    ]
    fr = front(rs, DIRS)
    assert [r.number for r in fr] == [0, 3, 4, 6]
    assert dominates(rs[4].scores, rs[5].scores, DIRS) and not dominates(rs[3].scores, rs[6].scores, DIRS)
    assert pick(rs, DIRS, "max-safety").number == 3  # a tie goes to the earlier trial
    assert pick(rs, DIRS, "max-medical").number == 0
    # Ideal point (0.95, 0.6): trial 3 is 0.08 from it, trial 4 0.45, trial 0 0.95.
    assert knee(fr, DIRS).number == 3 and pick(rs, DIRS, "knee").number == 3
    best = best_baseline(rs, DIRS)
    assert [r.number for r in best] == [1]  # lambda=1 is infeasible: the feasible grid point competes
    assert front_covers(fr, best[0], DIRS)
    assert not front_covers([rs[0]], best[0], DIRS)
    # Minimised objectives flip the comparison.
    assert [r.number for r in front(rs, {"safety": "minimize", "medical": "minimize"})] == [0, 1, 5]
    # Nothing feasible: every scored trial competes.
    assert [r.number for r in front([rs[2]], DIRS)] == [2]


def test_the_knee_weighs_the_objectives_in_their_own_units() -> None:
    """Rescaled to [0, 1] over the front, any two trials tie and a tiny spread outweighs a large one; in
    the rates' own units 0.22 -> 0.90 safety outweighs 0.800 -> 0.775 MCQ accuracy (the SmolLM2 study,
    seed 0), and 0.26 -> 0.89 safety outweighs 0.981 -> 0.954 (the toy demo, seed 1, on holdout)."""
    rs = [_rec(0, 0.0, 0.775, baseline="zero"), _rec(1, 0.217, 0.8), _rec(2, 0.5, 0.6), _rec(3, 0.9, 0.775),
          _rec(4, 1.0, 0.9, over=0.5)]  # infeasible: not on the front
    assert [r.number for r in front(rs, DIRS)] == [1, 3]
    assert pick(rs, DIRS, "knee").number == 3
    rs = [_rec(0, 0.0, 0.981), _rec(1, 0.258, 0.981), _rec(26, 0.892, 0.954)]
    assert pick(rs, DIRS, "knee").number == 26
    # Minimised objectives: the ideal is the front's lowest.
    low = {"safety": "minimize", "medical": "minimize"}
    assert pick([_rec(0, 0.1, 0.9), _rec(1, 0.5, 0.2), _rec(2, 0.15, 0.25)], low, "knee").number == 2


def _validated(r: TrialRecord, s: float, m: float, over: float) -> TrialRecord:
    from dataclasses import replace

    return replace(r, holdout={"scores": {"safety": s, "medical": m}, "constraints": {"over_refusal": over - 0.1},
                               "constraint_scores": {"over_refusal": over}, "feasible": over <= 0.1})


def test_picks_move_to_holdout_once_the_front_is_validated() -> None:
    from safesearch.pareto import picks

    rs = [_rec(0, 0.0, 0.8, baseline="zero"), _rec(1, 0.5, 0.7, baseline="lambda=0.5"), _rec(2, 0.9, 0.75),
          _rec(3, 0.95, 0.6)]
    before = picks(rs, DIRS)
    assert before.split == "search" and before.numbers == {"knee": 2, "max-safety": 3, "max-medical": 0}
    assert "run `safesearch validate`" in before.describe()
    # Validated: trial 3 over-refuses on holdout (no pick any more), the baseline lambda=0.5 does better there.
    rs = [_validated(rs[0], 0.0, 0.8, 0.0), _validated(rs[1], 0.6, 0.75, 0.05), _validated(rs[2], 0.85, 0.78, 0.1),
          _validated(rs[3], 0.97, 0.6, 0.3)]
    after = picks(rs, DIRS)
    assert after.split == "holdout" and after.feasible
    assert after.numbers == {"knee": 2, "max-safety": 2, "max-medical": 0}
    assert after.describe().startswith("picks on holdout")
    assert "max-medical = trial 0 (baseline zero)" in after.describe() and "every pick is a baseline" not in after.describe()
    # Every searched trial breaks the bound on holdout: the picks are baselines, and say so.
    only = picks([*rs[:2], _validated(rs[2], 0.85, 0.78, 0.3), rs[3]], DIRS)
    assert set(only.numbers.values()) <= {0, 1} and only.baselines == {0: "zero", 1: "lambda=0.5"}
    assert "every pick is a baseline" in only.describe()
    # A front trial not yet validated: back to the search split.
    assert picks([*rs[:2], _rec(2, 0.9, 0.75), rs[3]], DIRS).split == "search"
    # Nothing feasible on holdout: the picks say they break the constraints.
    worst = picks([_validated(r, 0.5, 0.5, 0.9) for r in rs], DIRS)
    assert not worst.feasible and "no trial meets the constraints on the holdout split" in worst.describe()


# -- trials on the small toy world -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_spec(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> StudySpec:
    return _spec(tmp_path_factory.mktemp("search"), toyworld_small, n_trials=4)


@pytest.fixture(scope="module")
def worker(world_spec: StudySpec):
    w = open_worker(world_spec, device="cpu")
    yield w
    w.close()


def test_a_study_runs_its_baselines_first_and_records_every_trial(
    world_spec: StudySpec, worker, tmp_path: Path, toyworld_small: Path
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url)
    store = artifact_store_for(url)
    worker.artifact_store = store
    study, created = ensure_study(world_spec, storage, worker.space)
    assert created
    seen: list[Any] = []
    assert worker.work(study, world_spec.n_trials, on_trial=seen.append) == 4
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.user_attrs.get(BASELINE_ATTR) for t in trials] == ["zero", "lambda=0.5", None, None]
    zero = trials[0]
    assert set(zero.params.values()) == {0.0}
    assert all(c == 0.0 for row in zero.user_attrs["coefficients"].values() for c in row.values())
    for t in trials:
        u = t.user_attrs
        assert set(u["scores"]) == {"safety", "medical"} and set(u["constraint_scores"]) == {"over_refusal"}
        assert t.values == [u["scores"]["safety"], u["scores"]["medical"]]
        violation = pytest.approx(u["constraint_scores"]["over_refusal"] - 0.1)
        # Optuna 5's per-name constraint, and the list optuna-dashboard reads (Optuna reads it too, as "0").
        assert t.constraints == {"over_refusal": violation, "0": violation}
        assert t.system_attrs["constraints"] == [violation]
        assert u["seconds"]["merge"] >= 0 and u["seconds"]["eval"] > 0
        assert set(u["suites"]) == {
            "toy-harmful-general@search[12]", "toy-harmful-medical@search[12]",
            "toy-mcq-medical@search[12]", "toy-benign@search[12]",
        }
        (meta,) = get_all_artifact_meta(t, storage=storage)
        assert meta.filename == f"responses-{t.number}.jsonl" and meta.mimetype == "application/jsonl"
        path = tmp_path / f"a{t.number}.jsonl"
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta.artifact_id)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 4 * 12 and len({(r["suite"], r["id"]) for r in rows}) == 48
        harmful = [r for r in rows if r["suite"] == "toy-harmful-general@search[12]"]
        items = {it.id: it for it in worker.tasks["toy-harmful-general@search[12]"].items}
        assert len(harmful) == 12
        # The prompt beside the response and its verdict: the request as the model was asked it.
        assert all(r["prompt"] == items[r["id"]].text and "response" in r and "verdict" in r for r in harmful)
        mcq = [r for r in rows if r["suite"] == "toy-mcq-medical@search[12]"]
        assert all("\nA) " in r["prompt"] and isinstance(r["choice"], int) and "correct" in r for r in mcq)
    assert [o.number for o in seen] == [0, 1, 2, 3]
    assert all(o.seconds["total"] >= o.seconds["eval"] > 0 for o in seen)

    # The zero baseline is the anchor as is: the same scores as the medical checkpoint loaded plainly.
    plain = TransformersBackend.from_pretrained(toyworld_small / "medical")
    assert score_all(world_spec, run_tasks(plain, worker.tasks))["scores"] == zero.user_attrs["scores"]

    # The budget is reached: another worker pass runs nothing.
    assert worker.work(study, world_spec.n_trials) == 0
    # Joining with the same spec works; with another search space or other directions it does not.
    assert ensure_study(world_spec, storage, worker.space)[1] is False
    other = study_spec_from_dict({**world_spec.to_dict(), "search": {**world_spec.to_dict()["search"],
                                  "safety": {"range": [0.0, 2.0]}}})
    with pytest.raises(UserError, match=r"study 't' exists with another spec"):
        ensure_study(other, storage, build_space(other, *groups_of(other)))
    single = study_spec_from_dict({**world_spec.to_dict(), "sampler": {"name": "cmaes-weighted"}})
    with pytest.raises(UserError, match=r"study 't' in storage sqlite:///.*s.db exists with directions \[maximize, maximize\], not \[maximize\]"):
        ensure_study(single, storage, worker.space)
    rs = records(study)
    assert len(rs) == 4 and front(rs, {"safety": "maximize", "medical": "maximize"})


def test_cmaes_weighted_is_single_objective_with_a_front(world_spec: StudySpec, worker, tmp_path: Path) -> None:
    d = world_spec.to_dict()
    d.update(name="w", n_trials=3, sampler={"name": "cmaes-weighted", "weights": {"safety": 0.7, "medical": 0.3}},
             baselines={"zero": True})
    spec = study_spec_from_dict(d)
    worker.spec, worker.artifact_store = spec, None
    try:
        study, _ = ensure_study(spec, RDBStorage(f"sqlite:///{tmp_path / 'w.db'}"), worker.space)
        assert worker.work(study, spec.n_trials) == 3
    finally:
        worker.spec = world_spec
    assert isinstance(study.sampler, optuna.samplers.CmaEsSampler)
    for t in study.get_trials():
        s = t.user_attrs["scores"]
        assert t.values == [pytest.approx(0.7 * s["safety"] + 0.3 * s["medical"])]
        assert objective_values(spec, s) == t.values
    assert front(records(study), {"safety": "maximize", "medical": "maximize"})


class _Failing:
    """The worker's grafted model, failing (raising ``error``) on the applies numbered in ``fail``."""

    def __init__(self, real: Any, fail: Any, error: BaseException) -> None:
        self.real, self.fail, self.error, self.n = real, fail, error, 0

    @property
    def backend(self) -> Any:
        return self.real.backend

    def apply(self, coefs: Any) -> None:
        self.n += 1
        if self.fail(self.n):
            raise self.error
        self.real.apply(coefs)


@contextmanager
def _patched(worker: Any, fail: Any, error: BaseException, **spec_changes: Any) -> Iterator[None]:
    real, spec, retry = worker.grafted, worker.spec, worker.retry
    worker.grafted = _Failing(real, fail, error)
    worker.spec = replace(spec, **spec_changes)
    worker.retry = RetryTrial(worker.spec.max_retries)
    try:
        yield
    finally:
        worker.grafted, worker.spec, worker.retry = real, spec, retry


def test_a_failing_trial_is_told_fail_and_queued_again_with_clean_attrs(world_spec: StudySpec, worker,
                                                                       tmp_path: Path) -> None:
    study, _ = ensure_study(world_spec, RDBStorage(f"sqlite:///{tmp_path / 'f.db'}"), worker.space)
    trial = study.ask()
    trial.set_user_attr("scores", {"safety": 1.0})  # what a half-done trial may hold
    with _patched(worker, lambda n: True, RuntimeError("device lost\nsecond line")), \
            pytest.raises(TrialFailed, match="device lost") as failed:
        worker.run_trial(study, trial)
    t, *_, retry = study.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["error"] == "RuntimeError: device lost"
    assert failed.value.retry == retry.number and retry.state == TrialState.WAITING
    assert retry.params == t.params and retry.user_attrs == {"retry_of": t.number, BASELINE_ATTR: "zero"}
    assert retry.system_attrs == {"failed_trial": t.number, "retry_history": [t.number],
                                  "fixed_params": t.system_attrs["fixed_params"]}  # an enqueued baseline's values


def test_a_worker_outlives_failing_trials_and_every_baseline_runs(world_spec: StudySpec, worker,
                                                                  tmp_path: Path) -> None:
    """Every 3rd trial raises (a judge that is down now and then): the worker goes on, each failure is
    retried, and the study ends with its n_trials COMPLETE, each baseline once, nothing RUNNING."""
    study, _ = ensure_study(world_spec, RDBStorage(f"sqlite:///{tmp_path / 'g.db'}"), worker.space)
    failures: list[TrialFailed] = []
    with _patched(worker, lambda n: n % 3 == 0, RuntimeError("objective 'safety': no item was judged")):
        assert worker.work(study, world_spec.n_trials, on_failure=failures.append) == world_spec.n_trials
    counts = {s: len(study.get_trials(states=(s,))) for s in TrialState}
    assert counts[TrialState.COMPLETE] == world_spec.n_trials and counts[TrialState.RUNNING] == 0
    assert counts[TrialState.FAIL] == len(failures) >= 1 and counts[TrialState.WAITING] == 0
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(b for t in done if (b := t.user_attrs.get(BASELINE_ATTR))) == ["lambda=0.5", "zero"]
    assert all(f.retry is not None for f in failures) and not unretried_failures(study)
    assert all("error" not in t.user_attrs for t in done)  # a retry starts clean


def test_retries_are_bounded_and_a_broken_setup_stops_the_worker(world_spec: StudySpec, worker,
                                                                 tmp_path: Path) -> None:
    study, _ = ensure_study(world_spec, RDBStorage(f"sqlite:///{tmp_path / 'h.db'}"), worker.space)
    with _patched(worker, lambda n: True, RuntimeError("judge unreachable"), max_retries=1,
                  max_consecutive_failures=3), \
            pytest.raises(UserError, match=r"worker stopped: 3 trials failed in a row .* trial 2, with "
                                           r"RuntimeError: judge unreachable"):
        worker.work(study, world_spec.n_trials)
    states = [t.state for t in study.get_trials()]
    # zero (0) and lambda (1) failed and were queued again (2, 3); zero's retry failed too: spent.
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert [t.number for t in unretried_failures(study)] == [2]


def test_an_interrupted_trial_is_failed_and_queued_then_the_interrupt_goes_on(world_spec: StudySpec, worker,
                                                                             tmp_path: Path) -> None:
    study, _ = ensure_study(world_spec, RDBStorage(f"sqlite:///{tmp_path / 'i.db'}"), worker.space)
    with _patched(worker, lambda n: True, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        worker.work(study, world_spec.n_trials)
    t0, _, retry = study.get_trials()
    assert t0.state == TrialState.FAIL and t0.user_attrs["error"] == "interrupted (Ctrl-C or SIGTERM)"
    assert retry.state == TrialState.WAITING and retry.user_attrs[BASELINE_ATTR] == "zero"
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_study_interrupted_while_being_set_up_is_removed(world_spec: StudySpec, worker, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Half set up (no fingerprint), it would stall every later worker for a minute and then refuse."""
    storage = RDBStorage(f"sqlite:///{tmp_path / 'h.db'}")

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.study.Study, "enqueue_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_study(world_spec, storage, worker.space)
    assert optuna.get_all_study_names(storage) == []
    monkeypatch.undo()
    assert ensure_study(world_spec, storage, worker.space)[1] is True


def test_a_baseline_failed_before_it_ran_is_retried_with_its_own_values(world_spec: StudySpec, worker,
                                                                        tmp_path: Path) -> None:
    """An enqueued trial has no params until its first suggest: its retry must carry the enqueued values,
    or it would be sampled under the baseline's name."""
    from safesearch.storage import give_up

    study, _ = ensure_study(world_spec, RDBStorage(f"sqlite:///{tmp_path / 'b.db'}"), worker.space)
    study.ask()  # zero
    lam = study.ask()  # lambda=0.5, interrupted before its first suggest
    assert lam.params == {}
    retry_number = give_up(study, lam, "interrupted before it ran", RetryTrial())
    retry = study.ask()
    assert retry.number == retry_number and retry.user_attrs[BASELINE_ATTR] == "lambda=0.5"
    coefs = worker.space.suggest(retry)
    assert set(coefs["safety"].values()) == {0.5} and set(coefs["medical"].values()) == {0.0}


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random", "cmaes-weighted"])
def test_every_sampler_proposes_past_its_random_start(tmp_path: Path, name: str) -> None:
    """Each sampler a spec may name samples from its model, not only its random start: `gp` needs scipy
    from its first model-based trial on (without it every gp trial failed after the start-up ones)."""
    options = {"tpe": {"n_startup_trials": 2}, "gp": {"n_startup_trials": 2}, "nsga2": {"population_size": 2}}
    d = spec_dict(tmp_path, tmp_path)
    d["sampler"] = {"name": name, "options": options.get(name, {})}
    from safesearch.search import make_sampler

    spec = study_spec_from_dict(d)
    study = optuna.create_study(directions=spec.directions, sampler=make_sampler(spec))
    for _ in range(5):
        t = study.ask()
        a, b = t.suggest_float("a", 0, 1), t.suggest_float("b", -0.5, 0.5)
        t.set_constraint("over_refusal", a - 0.8)
        study.tell(t, objective_values(spec, {"safety": a, "medical": 1 - abs(b)}))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
