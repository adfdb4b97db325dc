"""Workers behind ``safesearch storage proxy`` (Optuna's gRPC storage proxy plus safesearch's heartbeat
service) on the real PostgreSQL: the proxy runs as a real subprocess on a free port and the workers take
``--storage grpc://...``. A worker completes a study through it (and ``pareto`` reads it back through it);
of two real ``safesearch worker`` processes, one killed with SIGKILL in the middle of a trial leaves a
trial that the proxy's heartbeat (1 s, grace 3 s, set on the proxy) reports stale to the other, which fails
it and runs its retry, through the proxy too."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from study_world import spec_dict, write_spec
from test_distributed import (
    check_exactly_n,
    check_retried_elsewhere,
    kill_in_a_trial,
    load,
    wait_all,
    write_toy_spec,
)

from safesearch.proxy import SERVER_THREADS
from safesearch.storage import open_storage

pytestmark = pytest.mark.postgres

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("SAFESEARCH_STORAGE", None)
# The kill test's heartbeat, as in test_distributed, but set once, on the proxy: workers take it from there.
HEARTBEAT = ["--heartbeat", "1", "--heartbeat-grace", "3"]
START_TIMEOUT_S = 60
ADDRESS = re.compile(r"storage proxy on (grpc://127\.0\.0\.1:\d+) ")


@pytest.fixture(scope="module")
def proxy(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``safesearch storage proxy`` on a free port of 127.0.0.1: its grpc:// ``url`` and ``pid``. Stopped
    with SIGTERM afterwards, which must end it the CLI's way: one line and exit 130."""
    d = tmp_path_factory.mktemp("proxy")
    log = d / "proxy.err"
    cmd = [sys.executable, "-m", "safesearch", "storage", "proxy", "--storage", postgres_url, "--port", "0", *HEARTBEAT]
    with open(log, "w") as err:  # the child keeps its copy
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=d, env=ENV)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (found := ADDRESS.search(log.read_text())):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the storage proxy did not start (exit {p.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    yield {"url": found.group(1), "pid": p.pid}
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"the storage proxy did not stop on SIGTERM:\n{log.read_text()[-3000:]}")
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    assert p.returncode == 130 and lines[-1] == "error: interrupted", log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture
def study_env(postgres_url: str, proxy: dict, toyworld_small: Path, tmp_path: Path) -> Iterator[dict]:
    """A unique study on the test database, reached by the workers through the proxy (``url``) and by the
    test directly (``storage``); deleted afterwards."""
    name = f"grpc-{uuid.uuid4().hex[:10]}"
    storage = open_storage(postgres_url, heartbeat_interval=None)
    yield {"name": name, "url": proxy["url"], "proxy_pid": proxy["pid"], "world": toyworld_small, "dir": tmp_path,
           "storage": storage}
    if name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
    storage.engine.dispose()


def start_worker(env: dict, spec: Path, tag: str) -> subprocess.Popen:
    log = open(env["dir"] / f"worker-{tag}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [SAFESEARCH, "worker", str(spec), "--storage", env["url"], "--device", "cpu",
           "--artifacts", str(env["dir"] / "artifacts")]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=env["dir"], env=ENV)


def connections_of(env: dict, pid: int) -> int:
    """The PostgreSQL sessions that process ``pid`` of this machine holds (storage.py names each session
    ``safesearch HOST:PID`` in pg_stat_activity)."""
    engine = env["storage"].engine
    with engine.connect() as conn:
        return conn.execute(sa.text("select count(*) from pg_stat_activity where application_name = :n"),
                            {"n": f"safesearch {socket.gethostname()}:{pid}"[:63]}).scalar_one()


def test_a_worker_completes_a_study_through_the_proxy(study_env: dict, capsys: pytest.CaptureFixture) -> None:
    """``safesearch worker`` (in this process: torch is loaded already) completes a study through the proxy,
    and ``pareto`` reads it back through it (no heartbeat: it runs no trial)."""
    from safesearch.cli import main

    n_trials = 3
    data = spec_dict(study_env["dir"], study_env["world"], subset=8, n_trials=n_trials, name=study_env["name"],
                     constraints=[])
    spec = write_spec(study_env["dir"] / "spec.yaml", data)
    main(["worker", str(spec), "--storage", study_env["url"], "--device", "cpu",
          "--artifacts", str(study_env["dir"] / "artifacts")])
    err = " ".join(capsys.readouterr().err.split())
    assert f"study {study_env['name']} in {study_env['url']}" in err and "Traceback" not in err, err[-3000:]
    check_exactly_n(load(study_env), n_trials)
    main(["pareto", study_env["name"], "--storage", study_env["url"], "--json",
          "--plot", str(study_env["dir"] / "front.png")])
    assert json.loads(capsys.readouterr().out)["n_complete"] == n_trials


def test_killed_worker_trial_is_failed_and_retried_through_the_proxy(study_env: dict) -> None:
    """test_distributed's kill test through the proxy: two workers start together; one is killed with
    SIGKILL inside a trial (RUNNING, its ``worker`` attr naming it); the other learns from the proxy that
    the trial is stale, fails it, runs its retry (same coefficients, ``retry_of`` and ``retry_history``)
    and finishes the study with exactly n_trials COMPLETE and nothing RUNNING. Neither worker holds a
    database connection: the proxy holds them all."""
    n_trials = 6
    spec = write_toy_spec(study_env, n_trials)
    procs = {tag: start_worker(study_env, spec, tag) for tag in ("victim", "rescuer")}
    victim = procs.pop("victim")

    def only_the_proxy_connects() -> None:
        # Only the proxy holds database sessions, at most one per server thread.
        assert 0 < connections_of(study_env, study_env["proxy_pid"]) <= SERVER_THREADS
        assert connections_of(study_env, victim.pid) == 0, "a worker behind the proxy connected to the database"

    killed = kill_in_a_trial(study_env, victim, only_the_proxy_connects)
    wait_all(study_env, procs)
    study = load(study_env)
    check_exactly_n(study, n_trials)
    retry = check_retried_elsewhere(study, killed, victim)
    assert retry.user_attrs["retry_of"] == retry.system_attrs["retry_history"][-1]
    log = (study_env["dir"] / "worker-rescuer.log").read_text()
    assert "Traceback" not in log, log[-3000:]
