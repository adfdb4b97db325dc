"""Workers that outlive their database connection, on the real PostgreSQL server.

Each test works in a database of its own, so that it can cut its workers off without touching the other
tests: ``pg_terminate_backend`` on the workers' sessions (found by their application name) ends their
connections as a server restart, a failover or an idle timeout would; ``ALLOW_CONNECTIONS false`` on the
database meanwhile turns the cut into an outage (every reconnect refused) for as long as the test says.

- The storage itself: a call that meets an outage waits (one line lost, one line back) and succeeds; past
  its ``max_outage_s`` it raises :class:`StorageOutage`, one line; an error that is not an outage is
  raised at once.
- A real ``safesearch worker``: its connections cut ten times, mid-trial and between trials, the study
  still ends with exactly n_trials COMPLETE, nothing RUNNING or WAITING, no failed trial without a retry,
  and no traceback.
- A worker whose server stays away past ``--max-outage`` exits with one line; its trial stays RUNNING
  until the next worker fails it as stale and runs its retry, which starts with no inherited scores.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from study_world import spec_dict, write_spec

from safesearch import reconnect
from safesearch.reconnect import Backoff, Heartbeat, ReconnectingStorage, StorageOutage, is_outage
from safesearch.storage import count_states, fail_stale, open_storage, unretried_failures

pytestmark = pytest.mark.postgres

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))
HEARTBEAT = ["--heartbeat", "1", "--heartbeat-grace", "3"]
WORKER_TIMEOUT_S = 240


class Server:
    """Cuts and outages of one database of the test server, driven from the test's own connection."""

    def __init__(self, admin: sa.Engine, database: str) -> None:
        self.admin, self.database = admin, database

    def _run(self, sql: str, **params: object) -> int:
        with self.admin.connect() as conn:
            return len(conn.execute(sa.text(sql), params).fetchall())

    def cut(self) -> int:
        """End every safesearch session on the database (the test's own are not named so): how many."""
        return self._run("select pg_terminate_backend(pid) from pg_stat_activity "
                         "where datname = :db and application_name like 'safesearch %'", db=self.database)

    def allow(self, allowed: bool) -> None:
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'alter database "{self.database}" with allow_connections {str(allowed).lower()}'))

    def outage(self, seconds: float) -> None:
        """Refuse connections for ``seconds``, the open ones cut at the start."""
        self.allow(False)
        try:
            self.cut()
            time.sleep(seconds)
        finally:
            self.allow(True)


@pytest.fixture
def server(postgres_url: str) -> Iterator[tuple[Server, str]]:
    """(a Server, the URL of a fresh database of its own), dropped afterwards."""
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"safesearch_outage_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    url = sa.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield Server(admin, name), url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'alter database "{name}" with allow_connections true'))
            conn.execute(sa.text(f'drop database "{name}" with (force)'))
        admin.dispose()


def test_is_outage_tells_a_lost_server_from_a_refused_request(postgres_url: str) -> None:
    closed = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test",
                              connect_args={"connect_timeout": 2})
    with pytest.raises(sa.exc.OperationalError) as lost:
        closed.connect()
    assert is_outage(lost.value)
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
        conn.execute(sa.text("select 1/0"))
    assert not is_outage(refused.value)
    engine.dispose()


def test_a_call_waits_out_an_outage_and_says_so(server: tuple[Server, str]) -> None:
    srv, url = server
    lines: list[str] = []
    storage = open_storage(url, heartbeat_interval=None)
    assert isinstance(storage, ReconnectingStorage)
    storage.outages.report = lines.append
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])
    study.enqueue_trial({"x": 1.0})
    outage = threading.Thread(target=srv.outage, args=(1.5,))
    outage.start()
    time.sleep(0.3)  # the cut has happened: the next call finds no connection and none to be had
    t0 = time.monotonic()
    trial = study.ask()  # create, pop the waiting trial: several transactions, each waited for
    waited = time.monotonic() - t0
    outage.join()
    trial.suggest_float("x", 0, 2)
    study.tell(trial, 1.0)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    assert waited >= 0.8, f"the call returned after {waited:.2f} s, during the outage"
    assert len(lines) == 2, lines
    assert "connection lost" in lines[0] and "reconnected after" in lines[1], lines
    storage.engine.dispose()


def test_past_max_outage_a_call_gives_up_in_one_line(server: tuple[Server, str]) -> None:
    srv, url = server
    storage = open_storage(url, heartbeat_interval=None, max_outage_s=1.0)
    storage.outages.report = lambda line: None
    study = optuna.create_study(storage=storage, study_name="s")
    srv.allow(False)
    try:
        srv.cut()
        t0 = time.monotonic()
        with pytest.raises(StorageOutage) as gave_up:
            study.get_trials()
        assert 0.9 <= time.monotonic() - t0 < 10
    finally:
        srv.allow(True)
    message = gave_up.value.message
    assert "\n" not in message and "unreachable for 1 s" in message and "gives up" in message, message
    assert "postgres@" in message  # the storage is named
    storage.engine.dispose()


def test_a_refused_request_is_not_waited_for(server: tuple[Server, str]) -> None:
    _, url = server
    storage = open_storage(url, heartbeat_interval=None, max_outage_s=60)
    storage.backoff = Backoff(max_outage_s=60)
    t0 = time.monotonic()
    with pytest.raises(KeyError):  # no such study: the server answered
        storage.get_study_id_from_name("no-such-study")
    assert time.monotonic() - t0 < 5
    storage.engine.dispose()


# -- a real worker ------------------------------------------------------------------------------------------


def start_worker(spec: Path, url: str, cwd: Path, tag: str, *extra: str) -> subprocess.Popen:
    log = open(cwd / f"worker-{tag}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [SAFESEARCH, "worker", str(spec), "--storage", url, "--device", "cpu", "--artifacts",
           str(cwd / "artifacts"), "--threads", "1", *HEARTBEAT, *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def finish(p: subprocess.Popen, cwd: Path, tag: str) -> tuple[int, str]:
    try:
        p.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"worker {tag} hung; log:\n{(cwd / f'worker-{tag}.log').read_text()[-4000:]}")
    return p.returncode, (cwd / f"worker-{tag}.log").read_text()


def running_trial(storage: optuna.storages.RDBStorage, name: str) -> bool:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return bool(storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)))


def wait_for_a_trial(p: subprocess.Popen, storage: optuna.storages.RDBStorage, name: str) -> None:
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while p.poll() is None and time.monotonic() < deadline:
        if running_trial(storage, name):
            return
        time.sleep(0.05)


def check_whole(study: optuna.Study, n_trials: int) -> None:
    """Exactly n_trials COMPLETE, nothing RUNNING or WAITING, every failed trial retried, and a retry's
    scores its own (a retry that did not complete has none)."""
    counts = count_states(study)
    listing = " ".join(f"{t.number}:{t.state.name}" for t in study.get_trials(deepcopy=False))
    assert counts[TrialState.COMPLETE] == n_trials, listing
    assert counts[TrialState.RUNNING] == counts[TrialState.WAITING] == 0, listing
    assert unretried_failures(study) == [], listing
    for t in study.get_trials(deepcopy=False):
        if "retry_of" in t.user_attrs and t.state != TrialState.COMPLETE:
            assert "scores" not in t.user_attrs, (t.number, t.user_attrs)


def test_a_worker_cut_off_ten_times_loses_nothing(
    server: tuple[Server, str], toyworld_small: Path, tmp_path: Path
) -> None:
    """Ten cuts of the worker's connections at seeded moments from its first trial on (three of them while
    a trial runs), every other one held as an outage of 0.5-1 s (under the heartbeat's 3 s grace): the
    worker rides out all of them."""
    srv, url = server
    n_trials = 50  # trials of 0.1-0.3 s here: the study outlasts the ten cuts
    name = f"cut-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "spec.yaml", spec_dict(tmp_path, toyworld_small, subset=64, n_trials=n_trials,
                                                        name=name, constraints=[]))
    reader = open_storage(url, heartbeat_interval=None)
    rng = random.Random(17)
    p = start_worker(spec, url, tmp_path, "cut")
    wait_for_a_trial(p, reader, name)
    cuts = []
    for i in range(10):
        time.sleep(rng.uniform(0.1, 0.5))
        if i % 4 == 0:
            # Cuts 0, 4 and 8 wait for a running trial: a worker whose storage calls bunch at a trial's
            # ends (safesearch.batch) is met between trials by most seeded moments, and a cut mid-trial
            # is what must be shown survived.
            wait_for_a_trial(p, reader, name)
        if p.poll() is not None:
            break
        mid_trial = running_trial(reader, name)
        if i % 2:
            srv.outage(rng.uniform(0.5, 1.0))
            ended = -1
        else:
            ended = srv.cut()
        cuts.append(("outage" if i % 2 else f"cut {ended}") + (" mid-trial" if mid_trial else ""))
    code, log = finish(p, tmp_path, "cut")
    print(f"{len(cuts)} cuts: {cuts}")
    assert len(cuts) == 10, f"the worker ended after {len(cuts)} cuts:\n{log[-4000:]}"
    assert any("mid-trial" in c for c in cuts), cuts
    assert code == 0, log[-4000:]
    assert "Traceback" not in log, log[-6000:]
    assert "Caught an error from sqlalchemy" not in log, log[-6000:]  # Optuna's fallback warning, dropped
    assert "connection lost" in log and "reconnected after" in log, log[-4000:]
    study = optuna.load_study(study_name=name, storage=reader)
    check_whole(study, n_trials)
    reader.engine.dispose()


def test_a_worker_past_its_max_outage_stops_in_one_line_and_its_trial_runs_again(
    server: tuple[Server, str], toyworld_small: Path, tmp_path: Path
) -> None:
    srv, url = server
    n_trials = 4
    name = f"gone-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "spec.yaml", spec_dict(tmp_path, toyworld_small, subset=64, n_trials=n_trials,
                                                        name=name, constraints=[]))
    reader = open_storage(url, heartbeat_interval=None)
    p = start_worker(spec, url, tmp_path, "gone", "--max-outage", "2")
    wait_for_a_trial(p, reader, name)
    srv.allow(False)
    try:
        srv.cut()
        code, log = finish(p, tmp_path, "gone")
    finally:
        srv.allow(True)
    assert code != 0, log[-4000:]
    assert "Traceback" not in log, log[-6000:]
    last = [ln for ln in log.splitlines() if ln.strip()][-1]
    assert last.startswith("error: storage ") and "unreachable for 2 s" in last, log[-4000:]
    study = optuna.load_study(study_name=name, storage=reader)
    stranded = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(stranded) == 1, [(t.number, t.state.name) for t in study.get_trials(deepcopy=False)]

    code, log = finish(start_worker(spec, url, tmp_path, "next"), tmp_path, "next")
    assert code == 0 and "Traceback" not in log, log[-4000:]
    study = optuna.load_study(study_name=name, storage=reader)
    check_whole(study, n_trials)
    first = study.trials[stranded[0].number]
    assert first.state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == first.number]
    assert len(retries) == 1, [t.user_attrs for t in retries]
    # The same point (a trial cut off before its last suggest has only some of its params stored).
    assert {k: retries[0].params[k] for k in first.params} == first.params
    reader.engine.dispose()


def test_a_heartbeat_slower_than_half_the_grace_period_says_so(
    server: tuple[Server, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A beat held up by a lock on the heartbeat table for 1.5 s, with a grace period of 2 s: the live
    trial could be taken for a dead worker's, and the worker says so, once."""
    _, url = server
    monkeypatch.setattr(reconnect, "_slow_beat_said", False)
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="slow", directions=["maximize"])
    trial = study.ask()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.execute(sa.text("lock table trial_heartbeats in access exclusive mode"))
        beating = Heartbeat(trial._trial_id, storage, 1, grace_s=2)
        beating.start()
        time.sleep(1.5)
        conn.commit()
    time.sleep(1.5)
    beating.join()
    err = capsys.readouterr().err
    assert err.count("over half the grace period (2 s)") == 1, err
    assert re.search(rf"heartbeat of trial id {trial._trial_id} took 1\.\d s", err), err
    engine.dispose()
    storage.engine.dispose()


def test_stale_trials_are_judged_a_grace_period_after_an_outage(server: tuple[Server, str]) -> None:
    """Every beat sent during an outage is lost: right after it, a live worker's trial looks as stale as a
    dead one's. A worker whose storage came back within the grace period judges no trial stale; once the
    grace period has passed without a beat, the trial is failed and retried as usual."""
    srv, url = server
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    storage.outages.report = lambda line: None
    study = optuna.create_study(storage=storage, study_name="settle", directions=["maximize"])
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    srv.outage(3.0)  # longer than the grace period; the first call after it finds the cut connection
    fail_stale(study)
    assert study.trials[trial.number].state == TrialState.RUNNING
    time.sleep(2.5)  # the grace period since the storage came back, without a beat
    fail_stale(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.WAITING], states  # failed, and its retry queued
    storage.engine.dispose()


def test_optunas_fallback_warning_about_a_lost_connection_is_dropped(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Optuna's trial read logs a dozen lines (the SQL, its parameters) when a cut connection fails it, and
    tries again; the storage has its own line for the lost connection, so that warning is dropped. Optuna's
    other warnings are kept."""
    from optuna.storages._rdb import storage as optuna_rdb

    storage = open_storage(postgres_url, heartbeat_interval=None)
    optuna.logging.enable_propagation()  # to pytest's handler on the root logger
    try:
        optuna_rdb._logger.warning("Caught an error from sqlalchemy: (psycopg.OperationalError) consuming input "
                                   "failed: server closed the connection unexpectedly\n[SQL: SELECT ...]. Falling "
                                   "back to a slower alternative.")
        optuna_rdb._logger.warning("Caught an error from sqlalchemy: (psycopg.errors.AdminShutdown) terminating "
                                   "connection due to administrator command\n[SQL: SELECT ...]. Falling back to a "
                                   "slower alternative.")  # pg_terminate_backend, a server restart
        optuna_rdb._logger.warning("some other warning")
    finally:
        optuna.logging.disable_propagation()
    logged = [r.getMessage() for r in caplog.records]
    assert "some other warning" in logged and not any("Caught an error" in m for m in logged), logged
    storage.engine.dispose()
