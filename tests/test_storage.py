"""The study storage: URLs and their masking, one-line errors, SQLite default, PostgreSQL under races."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from safesearch.cli import main
from safesearch.errors import UserError
from safesearch.storage import (
    DEFAULT_STORAGE_URL,
    SURPLUS_ATTR,
    artifact_store_for,
    count_states,
    fail_stale,
    mask_url,
    next_trial,
    open_storage,
    open_study,
    resolve_url,
)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://postgres:s3cr%40t@db.example:5432/studies",
         "postgresql+psycopg://postgres:***@db.example:5432/studies"),
        ("postgresql+psycopg2://u:p@h/d?sslmode=require", "postgresql+psycopg2://u:***@h/d?sslmode=require"),
        ("postgresql+psycopg://user:p@ss@host:5432/db", "postgresql+psycopg://user:***@host:5432/db"),
        ("postgresql+psycopg://u@h:5432/d?password=hunter2&x=1", "postgresql+psycopg://u@h:5432/d?password=***&x=1"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/test", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        ("sqlite:///storage/safesearch.db", "sqlite:///storage/safesearch.db"),
        # Unescaped '/', '?', '@' and ':' in a password, and a secret query field holding them.
        ("postgresql+psycopg://postgres:s3/cr@t?x:y@db:5432/s", "postgresql+psycopg://postgres:***@db:5432/s"),
        ("postgresql://u@h/d?sslmode=require&password=a/b@c&x=1", "postgresql://u@h/d?sslmode=require&password=***&x=1"),
        ("https://judge.example/v1?api_key=abc123", "https://judge.example/v1?api_key=***"),
    ],
)
def test_mask_url_hides_passwords_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_every_url_in_a_message_is_masked() -> None:
    from safesearch.redact import mask_secrets

    line = "storage postgresql://u:p/w@h/d: cannot connect ('https://a:b@judge/v1' timed out)"
    assert mask_secrets(line) == "storage postgresql://u:***@h/d: cannot connect ('https://a:***@judge/v1' timed out)"


def test_a_password_with_a_slash_is_never_printed(postgres_url: str, toyworld_small: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Trust authentication ignores the password: the study is created, and the line that says where
    shows the URL masked."""
    from study_world import spec_dict, write_spec

    name = f"mask-{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(postgres_url).render_as_string(hide_password=False)
    url = url.replace("postgres@", "postgres:s3/cr?t@", 1)
    spec = write_spec(tmp_path / "s.yaml", spec_dict(tmp_path, toyworld_small, n_trials=2, name=name))
    with pytest.raises(SystemExit) as e:
        main(["study", "create", str(spec), "--storage", url])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    try:
        assert e.value.code == 0, err
        assert "s3/cr" not in out + err and "postgres:***@127.0.0.1" in err
    finally:
        if name in optuna.get_all_study_names(postgres_url):
            optuna.delete_study(study_name=name, storage=postgres_url)


def test_resolve_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFESEARCH_STORAGE", raising=False)
    assert resolve_url(None) == DEFAULT_STORAGE_URL == "sqlite:///storage/safesearch.db"
    monkeypatch.setenv("SAFESEARCH_STORAGE", "postgresql://u@h/d")
    assert resolve_url(None) == "postgresql+psycopg://u@h/d"  # psycopg 3: what is installed
    assert resolve_url("runs/x.db") == "sqlite:///runs/x.db"
    assert resolve_url("postgresql+psycopg2://u@h/d") == "postgresql+psycopg2://u@h/d"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_sqlite_default_creates_store_under_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFESEARCH_STORAGE", raising=False)
    monkeypatch.delenv("SAFESEARCH_ARTIFACTS", raising=False)
    storage = open_storage()
    study = open_study(storage, "s", ["maximize", "maximize"])
    study.tell(study.ask(), [0.5, 0.5])
    assert (tmp_path / "storage" / "safesearch.db").is_file()
    assert Path(artifact_store_for()._base_path) == Path("storage") / "artifacts"
    assert (tmp_path / "storage" / "artifacts").is_dir()
    # Reopening sees the same study (a second process resumes it).
    again = open_study(open_storage(), "s", ["maximize", "maximize"])
    assert [t.values for t in again.trials] == [[0.5, 0.5]]
    # Artifacts of a server URL default to storage/artifacts; an explicit path wins.
    assert Path(artifact_store_for("postgresql+psycopg://u@h/d")._base_path) == Path("storage/artifacts")
    assert Path(artifact_store_for(None, tmp_path / "shared")._base_path) == tmp_path / "shared"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/studies",
         "error: storage postgresql+psycopg://postgres:***@127.0.0.1:1/studies: cannot connect to host "
         "127.0.0.1:1, database 'studies' ("),
        ("mysql://root:s3cret@127.0.0.1/studies",
         "error: storage mysql://root:***@127.0.0.1/studies: unsupported database 'mysql'"),
        ("postgresql+psycopg2://postgres:s3cret@127.0.0.1/studies",
         "error: storage postgresql+psycopg2://postgres:***@127.0.0.1/studies: "),
        ("postgresql+psycopg://postgres:s3cret@127.0.0.1:notaport/studies",
         "error: storage postgresql+psycopg://postgres:***@127.0.0.1:notaport/studies: not a database URL"),
    ],
)
def test_bad_storage_url_is_one_line_with_password_masked(
    url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "--storage", url, "--port", "0"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "s3cret" not in err and "Traceback" not in err


def test_unknown_database_on_real_server_names_host_and_database(postgres_url: str) -> None:
    url = sa.engine.make_url(postgres_url).set(password="s3cret", database="no_such_db_safesearch")
    with pytest.raises(UserError) as e:
        open_storage(url.render_as_string(hide_password=False))
    msg = e.value.message
    assert "s3cret" not in msg and ":***@" in msg and "\n" not in msg
    assert "cannot connect to host 127.0.0.1:5432, database 'no_such_db_safesearch'" in msg
    assert "does not exist" in msg  # the server's own reason


@pytest.fixture
def fresh_schema(postgres_url: str) -> Iterator[str]:
    """A URL on the test database whose search_path is a new, empty schema (dropped afterwards),
    so that Optuna's tables are created from scratch."""
    schema = f"storage_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f"create schema {schema}"))
    sep = "&" if "?" in postgres_url else "?"
    try:
        yield f"{postgres_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"drop schema {schema} cascade"))
        engine.dispose()


INIT_WORKER = """
import sys, time, warnings
warnings.simplefilter("ignore")
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
from safesearch.storage import open_storage, open_study
url, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
study = open_study(open_storage(url, heartbeat_interval=1), "race", ["maximize", "maximize"])
study.tell(study.ask(), [1.0, 1.0])
print("ok", study._study_id)
"""


def test_concurrent_first_init_on_postgres(fresh_schema: str) -> None:
    """Workers started at the same moment on an empty database: all of them open the storage and
    join one study. (Plain RDBStorage inits race here: duplicate pg_type / table errors.)"""
    n = 5
    start = time.time() + 6  # after every interpreter has imported optuna and sqlalchemy
    procs = [
        subprocess.Popen([sys.executable, "-c", INIT_WORKER, fresh_schema, str(start)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert len({out.split()[1] for out, _ in outs}) == 1  # one study, the same id everywhere
    study = optuna.load_study(study_name="race", storage=open_storage(fresh_schema, heartbeat_interval=None))
    assert len(study.trials) == n
    with sa.create_engine(fresh_schema).connect() as conn:
        assert conn.execute(sa.text("select count(*) from version_info")).scalar_one() == 1
        assert conn.execute(sa.text("select count(*) from alembic_version")).scalar_one() == 1


def test_existing_study_with_other_directions_is_refused(postgres_url: str) -> None:
    storage = open_storage(postgres_url, heartbeat_interval=None)
    name = f"dirs-{uuid.uuid4().hex[:8]}"
    open_study(storage, name, ["maximize", "maximize"])
    try:
        with pytest.raises(UserError) as e:
            open_study(storage, name, ["maximize", "minimize"])
        assert e.value.message == (
            f"study {name!r} in storage {postgres_url} exists with directions [maximize, maximize], "
            "not [maximize, minimize]; choose another study name"
        )
        assert len(open_study(storage, name, ["maximize", "maximize"]).directions) == 2  # same: joins
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def test_missing_study_when_not_creating(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=None)
    with pytest.raises(UserError, match=r"^study 'nope': not found in storage sqlite:///"):
        open_study(storage, "nope", ["maximize"], create=False)


def test_pool_is_small_per_worker(postgres_url: str) -> None:
    storage = open_storage(postgres_url)
    pool = storage.engine.pool
    assert pool.size() == 2 and pool._max_overflow == 2 and pool._pre_ping
    assert storage.heartbeat_interval == 60 and storage.get_heartbeat_stale_trial_callback() is not None


def test_next_trial_keeps_the_budget(tmp_path: Path) -> None:
    """Single process, but the states other workers would leave: surplus asks are told FAIL, queued
    trials run first, and without a heartbeat a worker does not wait for others' running trials."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=None)
    study = open_study(storage, "budget", ["maximize"])
    study.enqueue_trial({"x": 0.0})
    first = next_trial(study, 3)
    assert first is not None and first.suggest_float("x", -1, 1) == 0.0  # the queued one
    other = study.ask()  # another worker's running trial
    third = next_trial(study, 3)
    assert third is not None
    assert next_trial(study, 3) is None  # budget held by running trials, nobody to wait for
    assert count_states(study)[TrialState.FAIL] == 0  # nothing was asked for beyond the budget
    for t in (first, other, third):
        t.suggest_float("x", -1, 1)
        study.tell(t, [1.0])
    assert next_trial(study, 3) is None
    counts = count_states(study)
    assert counts[TrialState.COMPLETE] == 3 and counts[TrialState.RUNNING] == 0


def test_next_trial_marks_surplus(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=None)
    study = open_study(storage, "surplus", ["maximize"])
    held = [study.ask(), study.ask()]  # two running trials of other workers
    # Budget 2 is held, but a queued trial exists: it is asked for, lies beyond the budget, is refused.
    study.enqueue_trial({"x": 0.5})
    assert next_trial(study, 2) is None
    (refused,) = study.get_trials(states=(TrialState.FAIL,))
    assert refused.system_attrs[SURPLUS_ATTR] is True and refused.number == 2
    for t in held:
        study.tell(t, [0.0])
    assert count_states(study)[TrialState.COMPLETE] == 2


def test_a_trial_created_between_the_count_and_the_ask_is_counted(tmp_path: Path) -> None:
    """next_trial reads the study again only when the trials created since its count could fill the
    budget: here another worker asks between the two, and the trial it gets is refused as surplus."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=None)
    study = open_study(storage, "race", ["maximize"])
    held = [study.ask()]  # another worker's running trial: 1 of the budget of 2
    create = study._storage.create_new_trial

    def racing_create(*args: Any, **kwargs: Any) -> Any:
        study._storage.create_new_trial = create  # type: ignore[method-assign]
        held.append(study.ask())  # a third worker got there first
        return create(*args, **kwargs)

    study._storage.create_new_trial = racing_create  # type: ignore[method-assign]
    assert next_trial(study, 2) is None
    (refused,) = study.get_trials(states=(TrialState.FAIL,))
    assert refused.system_attrs[SURPLUS_ATTR] is True and refused.number == 2
    assert [t.number for t in held] == [0, 1]


def test_trial_that_never_beat_is_failed_and_retried(postgres_url: str) -> None:
    """A worker killed between its ask and its first heartbeat leaves a RUNNING trial that Optuna's own
    stale check never judges (no beat on record); fail_stale fails it after the grace period seen
    from here, and the retry is queued like any stale trial's."""
    storage = open_storage(postgres_url, heartbeat_interval=1, grace_period=1)
    name = f"silent-{uuid.uuid4().hex[:8]}"
    study = open_study(storage, name, ["maximize"])
    try:
        with pytest.warns(UserWarning, match="Heartbeat"):
            silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        fail_stale(study)  # first seen silent now
        assert study.get_trials()[0].state == TrialState.RUNNING
        time.sleep(1.5)
        fail_stale(study)
        failed, retry = study.get_trials()
        assert failed.number == silent.number and failed.state == TrialState.FAIL
        assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == silent.number
        assert retry.params == failed.params
        # The retry is what the next ask picks up, within the budget.
        picked = next_trial(study, 1)
        assert picked is not None and picked.number == retry.number
        study.tell(picked, [1.0])
        assert next_trial(study, 1) is None
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def test_worker_sessions_commit_without_waiting_for_the_flush_and_keep_url_options(fresh_schema: str) -> None:
    """open_storage turns synchronous_commit off for its sessions, and the URL's own ``options`` (here a
    search_path) still apply."""
    storage = open_storage(fresh_schema, heartbeat_interval=None)
    schema = fresh_schema.rsplit("search_path%3D", 1)[1]
    with storage.engine.connect() as conn:
        assert conn.execute(sa.text("show synchronous_commit")).scalar_one() == "off"
        assert conn.execute(sa.text("show search_path")).scalar_one() == schema
        tables = conn.execute(sa.text("select count(*) from information_schema.tables where table_schema = :s"),
                              {"s": schema}).scalar_one()
    assert tables > 0  # Optuna's tables went into the URL's schema


def test_sqlite_store_runs_in_wal_mode(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=None)
    with storage.engine.connect() as conn:
        assert conn.execute(sa.text("pragma journal_mode")).scalar_one() == "wal"
        assert conn.execute(sa.text("pragma synchronous")).scalar_one() == 1  # NORMAL


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "in-memory"])
def test_count_states_counts_what_the_study_holds(kind: str, postgres_url: str, tmp_path: Path) -> None:
    """count_states' one GROUP BY query on a database (the trials read and counted elsewhere) agrees
    with the study's trials, state by state, zeros included; and next_trial's ask still takes an
    enqueued trial first."""
    url = {"sqlite": f"sqlite:///{tmp_path / 's.db'}", "postgresql": postgres_url}.get(kind)
    storage = optuna.storages.InMemoryStorage() if url is None else open_storage(url, heartbeat_interval=None)
    name = f"count-{uuid.uuid4().hex[:8]}"
    study = open_study(storage, name, ["maximize"])
    try:
        for state in (TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
            study.tell(study.ask(), 1.0 if state == TrialState.COMPLETE else None, state=state)
        study.ask()  # RUNNING
        study.enqueue_trial({})  # WAITING
        expected = dict.fromkeys(TrialState, 0)
        for t in study.get_trials(deepcopy=False):
            expected[t.state] += 1
        assert count_states(study) == expected
        assert expected[TrialState.WAITING] == 1 and expected[TrialState.COMPLETE] == 2
        picked = next_trial(study, 10)
        assert picked is not None and picked.number == 5  # the enqueued one, not a new trial
        assert count_states(study)[TrialState.WAITING] == 0 and len(study.get_trials()) == 6
        assert next_trial(study, 10).number == 6  # none waiting: a new trial
    finally:
        if url == postgres_url:
            optuna.delete_study(study_name=name, storage=storage)
