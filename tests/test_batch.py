"""A trial's writes in one transaction (safesearch.batch): what is stored is what Optuna's calls store."""

from __future__ import annotations

import json
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from safesearch.batch import batched, save_note, tell
from safesearch.dashboard import record_constraint_list, save_trial_note, trial_note_of
from safesearch.storage import open_storage

LONG_NOTE = "## Trial\n\n" + "x" * 5000  # three of the dashboard's 2045-character chunks


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An opened storage as workers open it (PostgreSQL: a reconnecting one); its studies deleted after."""
    url = f"sqlite:///{tmp_path / 'batch.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    storage = open_storage(url, heartbeat_interval=None)
    names: list[str] = []
    storage.test_names = names  # type: ignore[attr-defined]
    yield storage
    for name in names:
        optuna.delete_study(study_name=name, storage=storage)


def _study(storage: Any, seed: int = 0, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    name = f"batch-{uuid.uuid4().hex[:8]}"
    storage.test_names.append(name)
    sampler = sampler or optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                                    n_startup_trials=4)
    return optuna.create_study(storage=storage, study_name=name, directions=["maximize", "maximize"], sampler=sampler)


class Commits:
    """Transactions committed on a storage's engine."""

    def __init__(self, storage: Any) -> None:
        self.n = 0
        sa.event.listen(storage.engine, "commit", self._count)
        self._engine = storage.engine

    def _count(self, _conn: Any) -> None:
        self.n += 1

    def close(self) -> None:
        sa.event.remove(self._engine, "commit", self._count)


class PerCall:
    """What the worker did before safesearch.batch: Optuna's calls one by one."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.study, self.trial = study, trial

    def set_constraint(self, key: str, value: float) -> None:
        self.trial.set_constraint(key, value)

    def save_note(self, body: str) -> None:
        from optuna_dashboard import save_note as dashboard_save_note

        dashboard_save_note(optuna.Trial(self.study, self.trial._trial_id), body)


def _trial(study: optuna.Study, batch: bool, n: int) -> None:
    """One trial as the worker runs it: suggest, attrs, constraints, the note, tell."""
    import contextlib

    trial = study.ask()

    def block() -> Any:
        return batched(study, trial) if batch else contextlib.nullcontext(PerCall(study, trial))

    with block():
        xs = [trial.suggest_float(f"v.g{i}", -1.0, 1.0) for i in range(6)]
        trial.set_user_attr("worker", "here:1")
    with block() as b:
        b.set_constraint("over_refusal", xs[0] - 0.5)
        record_constraint_list(trial, [xs[0] - 0.5])
        for k, v in {"scores": {"a": sum(xs)}, "coefficients": {"v": dict(enumerate(xs))}}.items():
            trial.set_user_attr(k, v)
        b.save_note(f"## Trial {trial.number}\n\n" + "y" * (1000 * (n % 4)))
    values = [sum(xs), -abs(xs[1])]
    if batch:
        tell(study, trial, values)
    else:
        study.tell(trial, values)


def _stored(study: optuna.Study) -> tuple[list[Any], dict[str, Any]]:
    """The study's trials (params, attrs, in stored order) and its system attrs, trial ids as numbers."""
    trials = study.get_trials()
    number = {t._trial_id: t.number for t in trials}
    rows = [(t.number, t.state, t.values, list(t.params.items()), list(t.user_attrs.items()),
             list(t.system_attrs.items())) for t in trials]
    attrs = {re.sub(r"^dashboard:(\d+):", lambda m: f"dashboard:#{number[int(m.group(1))]}:", k): v
             for k, v in study._storage.get_study_system_attrs(study._study_id).items()}
    return rows, attrs


def test_batched_trials_store_what_per_call_trials_store_and_sample_the_same(storage: Any) -> None:
    """Same seed, same study: the same sampled values (past TPE's random start), params in the same order,
    the same attrs and constraints, the same dashboard notes; one transaction per batch."""
    per_call, batch = _study(storage), _study(storage)
    commits = {}
    for study, batching in ((per_call, False), (batch, True)):
        counter = Commits(storage)
        try:
            for n in range(8):
                _trial(study, batching, n)
        finally:
            counter.close()
        commits[batching] = counter.n
    assert _stored(batch) == _stored(per_call)
    # Per trial, of Optuna's reads and writes: 6 parameters, 4 attrs and 3 for a constraint, 4 or more for the
    # note, one read in tell, less the two batches.
    assert commits[False] - commits[True] >= 8 * 16


def test_a_batch_is_one_transaction_and_a_read_sees_what_was_held(storage: Any) -> None:
    study = _study(storage, sampler=optuna.samplers.RandomSampler(seed=0))  # samples without reading
    trial = study.ask()
    commits = Commits(storage)
    try:
        with batched(study, trial):
            for i in range(10):
                trial.suggest_float(f"p{i}", 0.0, 1.0)
            trial.set_user_attr("worker", "w")
            assert commits.n == 0
            # A read in the block first writes what is held, so it sees it, as without batching.
            seen = study._storage.get_trial(trial._trial_id)
            assert list(seen.params) == [f"p{i}" for i in range(10)] and seen.user_attrs == {"worker": "w"}
            assert commits.n == 2
            trial.set_user_attr("more", 1)
        assert commits.n == 3
    finally:
        commits.close()
    assert study._storage.get_trial(trial._trial_id).user_attrs == {"worker": "w", "more": 1}


def test_notes_are_the_dashboards_own(storage: Any) -> None:
    """A long note, then a shorter one (the chunks past it blanked), on a trial and on the study: the same
    keys and values as optuna-dashboard's save_note, and get_note reads them back."""
    from optuna_dashboard import get_note
    from optuna_dashboard import save_note as dashboard_save_note

    ours, theirs = _study(storage), _study(storage)
    for study, save in ((ours, lambda s, t, body: save_note(s, t, body)),
                        (theirs, lambda s, t, body: dashboard_save_note(s if t is None else optuna.Trial(s, t), body))):
        trial = study.ask()
        for body in (LONG_NOTE, "short"):
            save(study, trial._trial_id, body)
            save(study, None, body + " (study)")
        study.tell(trial, [1.0, 1.0])
    a, b = _stored(ours)[1], _stored(theirs)[1]
    assert a == b and a["dashboard:#0:note_ver"] == 2 and a["dashboard:#0:note_str:2"] == ""
    assert get_note(optuna.Trial(ours, ours.trials[0]._trial_id)) == "short"
    assert get_note(ours) == "short (study)"
    save_trial_note(ours, ours.trials[0]._trial_id, LONG_NOTE)  # a finished trial's note (validate's)
    assert trial_note_of(ours, ours.trials[0]._trial_id) == LONG_NOTE


def test_a_constraint_already_set_is_kept_with_optunas_warning(storage: Any) -> None:
    study = _study(storage)
    trial = study.ask()
    trial.set_constraint("c", 0.5)
    with pytest.warns(UserWarning, match="already set"), batched(study, trial) as b:
        b.set_constraint("c", -1.0)
        b.set_constraint("d", 2.0)
    with pytest.raises(ValueError, match="NaN"), batched(study, trial) as b:
        b.set_constraint("e", float("nan"))
    assert study._storage.get_trial(trial._trial_id).constraints == {"c": 0.5, "d": 2.0}
    assert trial._cached_frozen_trial.system_attrs["constraints:d"] == 2.0


def test_a_block_that_raises_still_writes_what_it_held(storage: Any) -> None:
    study = _study(storage)
    trial = study.ask()
    with pytest.raises(RuntimeError, match="boom"), batched(study, trial):
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("worker", "w")
        raise RuntimeError("boom")
    stored = study._storage.get_trial(trial._trial_id)
    assert list(stored.params) == ["x"] and stored.user_attrs == {"worker": "w"}
    assert study._storage is not None and not hasattr(study._storage, "_ss_batch")  # the storage is back


def test_a_finished_trial_refuses_the_batch_as_it_refuses_each_call(storage: Any) -> None:
    study = _study(storage)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError), batched(study, trial):
        trial.set_user_attr("late", 1)


def test_a_transaction_made_again_after_a_lost_answer_writes_the_same(tmp_path: Path) -> None:
    """A reconnecting storage makes a transaction again when its answer was lost: the second attempt must
    find everything in place, not count the note's version twice, nor warn of its own constraint."""
    storage = open_storage(f"sqlite:///{tmp_path / 'again.db'}", heartbeat_interval=None)
    storage.call_reconnecting = lambda fn: (fn(), fn())[1]  # type: ignore[attr-defined]
    study = optuna.create_study(storage=storage, directions=["maximize"])
    trial = study.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with batched(study, trial) as b:
            trial.suggest_float("x", 0.0, 1.0)
            trial.set_user_attr("worker", "w")
            b.set_constraint("c", 0.25)
            b.save_note("note")
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.params.keys() == {"x"} and stored.user_attrs == {"worker": "w"} and stored.constraints == {"c": 0.25}
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs[f"dashboard:{trial._trial_id}:note_ver"] == 1


def test_storages_that_cannot_batch_take_each_call() -> None:
    """An in-memory storage (as a storage proxy's client: no RDBStorage here) gets Optuna's own calls."""
    study = optuna.create_study(directions=["maximize"])
    trial = study.ask()
    with batched(study, trial) as b:
        assert study._storage.__class__.__name__ == "InMemoryStorage"
        trial.suggest_float("x", 0.0, 1.0)
        b.set_constraint("c", 0.5)
        b.save_note("a note")
    tell(study, trial, [1.0])
    done = study.trials[0]
    assert done.state == TrialState.COMPLETE and done.constraints == {"c": 0.5}
    assert trial_note_of(study, done._trial_id) == "a note"
    assert json.dumps(done.params) == json.dumps({"x": trial.params["x"]})


class _Watching(optuna.samplers.TPESampler):
    """TPE that keeps, at each after_trial, the trial it is handed and the trial as stored at that moment."""

    seen: list[tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]]

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        rdb = study._storage
        while hasattr(rdb, "_ss_storage"):  # past tell's own view of the storage
            rdb = rdb._ss_storage
        self.seen.append((trial, rdb.get_trial(trial._trial_id)))
        super().after_trial(study, trial, state, values)


def test_tell_hands_the_sampler_the_trial_as_stored(storage: Any, tmp_path: Path) -> None:
    """tell skips Optuna's read of the trial: what the sampler's after_trial is handed instead, the trial as
    the worker holds it, is the trial as stored, system attrs written within a batch included (a
    constraint, the dashboard's constraint list, an artifact's record, the sampler's own)."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    sampler = _Watching(seed=0, multivariate=True, constant_liar=True, n_startup_trials=2)
    sampler.seen = []
    study = _study(storage, sampler=sampler)
    study.enqueue_trial({"v.g0": 0.25}, user_attrs={"baseline": "fixed"})
    (tmp_path / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "rows.jsonl").write_text("{}\n")
    for n in range(5):
        _trial(study, True, n)
    trial = study.ask()
    with batched(study, trial) as b:
        trial.suggest_float("v.g0", -1.0, 1.0)
        b.set_constraint("over_refusal", 0.1)
        upload_artifact(artifact_store=store, file_path=str(tmp_path / "rows.jsonl"), study_or_trial=trial)
    tell(study, trial, state=TrialState.PRUNED)
    assert len(sampler.seen) == 6
    for handed, stored in sampler.seen:
        assert handed == stored and handed.system_attrs == stored.system_attrs
        assert handed.user_attrs == stored.user_attrs and handed.datetime_start == stored.datetime_start
    assert any(k.startswith("artifacts:") for k in sampler.seen[-1][0].system_attrs)
    assert sampler.seen[0][0].system_attrs.get("fixed_params") == {"v.g0": 0.25}
    assert study.trials[-1].state == TrialState.PRUNED


def test_tell_of_a_trial_another_worker_failed_raises_update_finished(storage: Any) -> None:
    """The trial's state is checked by the write itself: a trial failed meanwhile (stale, by another
    worker) raises UpdateFinishedTrialError, which the worker takes as "its retry runs in its place"."""
    study = _study(storage)
    trial = study.ask()
    with batched(study, trial):
        trial.suggest_float("x", 0.0, 1.0)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        tell(study, trial, [1.0, 1.0])
    assert study.trials[0].state == TrialState.FAIL
