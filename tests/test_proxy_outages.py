"""Workers behind ``safesearch storage proxy`` when the proxy or its database goes away, on the real
PostgreSQL, each test in a database of its own (test_reconnect's ``server``) and with proxies of its own.

- The proxy killed (SIGKILL) under a worker in the middle of a trial and started again on the same port:
  the worker rides it out (one line lost, one back) and finishes the study. A worker told ``--max-outage
  2`` stops in one line instead, its trial left RUNNING; the next worker fails it as stale through the
  proxy and runs its retry. The study ends whole.
- The proxy's database away for longer than the proxy waits (``--max-outage 1`` on the proxy): the worker
  is told UNAVAILABLE, waits as for a proxy out of reach, and finishes the study; the proxy says so in
  two lines (lost, back).
- A call the proxy's database refuses (a role that may read but not write): the worker stops with one line
  naming the proxy's error, not a gRPC traceback.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from study_world import spec_dict, write_spec
from test_reconnect import Server, check_whole, finish, running_trial, server  # noqa: F401 - server: a fixture

from safesearch.storage import open_storage

pytestmark = pytest.mark.postgres

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))
PROXY_HEARTBEAT = ["--heartbeat", "1", "--heartbeat-grace", "3"]
START_TIMEOUT_S = 60
ADDRESS = re.compile(r"storage proxy on grpc://127\.0\.0\.1:(\d+) ")


class Proxy:
    """``safesearch storage proxy`` as a subprocess of the test, on a free port or a given one."""

    def __init__(self, url: str, cwd: Path, tag: str, *extra: str, port: int = 0) -> None:
        self.log = cwd / f"proxy-{tag}.log"
        cmd = [SAFESEARCH, "storage", "proxy", "--storage", url, "--port", str(port), *PROXY_HEARTBEAT, *extra]
        with open(self.log, "w") as err:  # the child keeps its copy
            self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (found := ADDRESS.search(self.log.read_text())):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.p.kill()
                pytest.fail(f"the storage proxy did not start (exit {self.p.poll()}):\n{self.text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(found.group(1))
        self.url = f"grpc://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        self.p.kill()
        self.p.wait()

    def stop(self) -> None:
        """SIGTERM, as a user's Ctrl-C: one line and exit 130, never a traceback."""
        if self.p.poll() is not None:
            return
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=15)
        assert self.p.returncode == 130, self.text()[-3000:]
        assert "Traceback" not in self.text(), self.text()[-3000:]


def start_worker(spec: Path, proxy: Proxy, cwd: Path, tag: str, *extra: str) -> subprocess.Popen:
    log = open(cwd / f"worker-{tag}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [SAFESEARCH, "worker", str(spec), "--storage", proxy.url, "--device", "cpu", "--artifacts",
           str(cwd / "artifacts"), "--threads", "1", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def wait_for_a_trial(p: subprocess.Popen, reader: optuna.storages.RDBStorage, name: str) -> None:
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        if running_trial(reader, name):
            return
        time.sleep(0.05)
    pytest.fail(f"no trial of {name} started (worker exit {p.poll()})")


@pytest.fixture
def study(server: tuple[Server, str], toyworld_small: Path, tmp_path: Path) -> Iterator[dict]:  # noqa: F811
    """A toy study spec on a database of its own, the database's URL and a direct reader of it."""
    srv, url = server
    name = f"proxy-out-{uuid.uuid4().hex[:8]}"
    n_trials = 10  # trials of about a second: the study outlasts a proxy's restart (seconds)
    spec = write_spec(tmp_path / "spec.yaml", spec_dict(tmp_path, toyworld_small, subset=64, n_trials=n_trials,
                                                        name=name, constraints=[]))
    reader = open_storage(url, heartbeat_interval=None)
    yield {"server": srv, "url": url, "name": name, "spec": spec, "dir": tmp_path, "reader": reader,
           "n_trials": n_trials}
    reader.engine.dispose()


def test_workers_ride_out_a_proxy_restart_or_stop_in_one_line_past_max_outage(study: dict) -> None:
    d, name = study["dir"], study["name"]
    proxy = Proxy(study["url"], d, "first")
    try:
        # A worker that waits 2 s at most: the proxy killed mid-trial, it stops in one line.
        p = start_worker(study["spec"], proxy, d, "impatient", "--max-outage", "2")
        wait_for_a_trial(p, study["reader"], name)
        proxy.kill()
        code, log = finish(p, d, "impatient")
        assert code != 0 and "Traceback" not in log, log[-4000:]
        last = [ln for ln in log.splitlines() if ln.strip()][-1]
        assert re.match(rf"error: storage {re.escape(proxy.url)}: unreachable for \d+ s \(UNAVAILABLE", last), log[-4000:]
        stranded = optuna.load_study(study_name=name, storage=study["reader"]).get_trials(
            deepcopy=False, states=(TrialState.RUNNING,))
        assert len(stranded) == 1, log[-4000:]

        # The proxy back on the same port; a patient worker, and the proxy killed and restarted under it.
        proxy = Proxy(study["url"], d, "second", port=proxy.port)
        p = start_worker(study["spec"], proxy, d, "patient")
        # Its first trial is the stranded one's retry, once the grace period is over: wait for one more.
        deadline = time.monotonic() + 240
        while len(optuna.load_study(study_name=name, storage=study["reader"]).get_trials(
                deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))) < 2:
            assert p.poll() is None and time.monotonic() < deadline, (d / "worker-patient.log").read_text()[-4000:]
            time.sleep(0.05)
        proxy.kill()
        time.sleep(2.0)
        proxy = Proxy(study["url"], d, "third", port=proxy.port)
        code, log = finish(p, d, "patient")
    finally:
        proxy.stop()
    assert code == 0 and "Traceback" not in log, log[-4000:]
    assert f"storage {proxy.url}: the storage proxy stopped answering (UNAVAILABLE" in log, log[-4000:]
    assert re.search(rf"storage {re.escape(proxy.url)}: reconnected after \d+\.\d s", log), log[-4000:]
    result = optuna.load_study(study_name=name, storage=study["reader"])
    check_whole(result, study["n_trials"])
    first = result.trials[stranded[0].number]
    assert first.state == TrialState.FAIL
    assert [t.user_attrs.get("retry_of") for t in result.trials].count(first.number) == 1


def test_the_proxys_database_away_reaches_workers_as_an_outage(study: dict) -> None:
    """The proxy waits 1 s for its database; held away for 4 s mid-trial, the worker hears UNAVAILABLE and
    waits on its side; the proxy says when it lost its database and when it got it back."""
    d, name, srv = study["dir"], study["name"], study["server"]
    proxy = Proxy(study["url"], d, "db-away", "--max-outage", "1")
    try:
        p = start_worker(study["spec"], proxy, d, "w")
        wait_for_a_trial(p, study["reader"], name)
        srv.outage(4.0)
        code, log = finish(p, d, "w")
    finally:
        proxy.stop()
    assert code == 0 and "Traceback" not in log, log[-4000:]
    assert "the storage proxy stopped answering (UNAVAILABLE: storage postgresql" in log, log[-4000:]
    assert "reconnected after" in log, log[-4000:]
    said = proxy.text()
    assert "connection lost" in said and "reconnected after" in said, said[-3000:]
    assert not re.search(r"^\w+ failed: ", said, re.M), said[-3000:]  # an outage is said once, not once per call
    check_whole(optuna.load_study(study_name=name, storage=study["reader"]), study["n_trials"])


def test_a_call_the_proxy_fails_stops_the_worker_in_one_line(study: dict) -> None:
    """The proxy logs in as a role that may read Optuna's tables but not write them: creating the study
    fails inside the proxy (permission denied), and the worker says so in one line."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(study["url"])
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'create role "{role}" login'))
    owner = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with owner.connect() as conn:  # the tables exist already (the study's reader made them)
            conn.execute(sa.text(f'grant select on all tables in schema public to "{role}"'))
        ro_url = url.set(username=role, password=None).render_as_string(hide_password=False)
        proxy = Proxy(ro_url, study["dir"], "read-only")
        try:
            code, log = finish(start_worker(study["spec"], proxy, study["dir"], "refused"), study["dir"], "refused")
        finally:
            proxy.stop()
    finally:
        with owner.connect() as conn:  # its grants, then the role
            conn.execute(sa.text(f'drop owned by "{role}" cascade'))
        owner.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop role "{role}"'))
        admin.dispose()
    assert code != 0 and "Traceback" not in log, log[-4000:]
    last = [ln for ln in log.splitlines() if ln.strip()][-1]
    assert last.startswith(f"error: storage {proxy.url}: the storage proxy failed this call (INTERNAL: "), log
    assert "permission denied for table" in last, log
    assert "failed: " in proxy.text() and "permission denied" in proxy.text(), proxy.text()[-3000:]
