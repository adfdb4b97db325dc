"""Many workers on the real PostgreSQL: separate ``safesearch worker`` processes serve one study of N
trials on the toy world and finish it with exactly N COMPLETE trials; a worker killed with SIGKILL in
the middle of a trial leaves a trial that the heartbeat fails and another worker retries."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from study_world import spec_dict, write_spec

from safesearch.storage import SURPLUS_ATTR, count_states, open_storage

pytestmark = pytest.mark.postgres

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))
# The kill test's heartbeat: a dead worker's trial is failed within seconds. (The other tests keep the
# default 60 s, as users do.)
HEARTBEAT = ["--heartbeat", "1", "--heartbeat-grace", "3"]
WORKER_TIMEOUT_S = 240


def write_toy_spec(env: dict, n_trials: int) -> Path:
    """The small toy study of tests/study_world.py with 64 items per suite and no constraint: a trial
    takes about a second, so the study outlasts the spread of the workers' start-up (seconds)."""
    data = spec_dict(env["dir"], env["world"], subset=64, n_trials=n_trials, name=env["name"], constraints=[])
    return write_spec(env["dir"] / "spec.yaml", data)


@pytest.fixture
def study_env(postgres_url: str, toyworld_small: Path, tmp_path: Path) -> Iterator[dict]:
    """A unique study name on the test database, deleted afterwards with its trials."""
    name = f"dist-{uuid.uuid4().hex[:10]}"
    storage = open_storage(postgres_url, heartbeat_interval=None)
    yield {"name": name, "url": postgres_url, "world": toyworld_small, "dir": tmp_path, "storage": storage}
    if name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)


def start_worker(env: dict, spec: Path, tag: str, *extra: str) -> subprocess.Popen:
    log = open(env["dir"] / f"worker-{tag}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [SAFESEARCH, "worker", str(spec), "--storage", env["url"], "--device", "cpu",
           "--artifacts", str(env["dir"] / "artifacts"), *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=env["dir"])


def wait_all(env: dict, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for tag, p in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"worker {tag} did not finish; log:\n{(env['dir'] / f'worker-{tag}.log').read_text()[-3000:]}")
        assert p.returncode == 0, f"worker {tag} exit {p.returncode}:\n{(env['dir'] / f'worker-{tag}.log').read_text()[-3000:]}"


def load(env: dict) -> optuna.Study:
    return optuna.load_study(study_name=env["name"], storage=env["storage"])


def check_exactly_n(study: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial]:
    """N COMPLETE trials with distinct coefficients; nothing left running or waiting; any other trial
    is one that failed (killed worker, or asked beyond the budget in a race and given back)."""
    counts = count_states(study)
    assert counts[TrialState.COMPLETE] == n, {s.name: c for s, c in counts.items() if c}
    assert counts[TrialState.RUNNING] == counts[TrialState.WAITING] == counts[TrialState.PRUNED] == 0
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == n, "two trials ran the same coefficients"
    for t in complete:
        assert len(t.values) == 2 and all(0.0 <= v <= 1.0 for v in t.values)
        assert set(t.user_attrs["scores"]) == {"safety", "medical"}
        assert any(k.startswith("artifacts:") for k in t.system_attrs), f"trial {t.number} has no artifact"
    baselines = [t.user_attrs["baseline"] for t in complete if "baseline" in t.user_attrs]
    assert sorted(baselines) == ["lambda=0.5", "zero"]  # each baseline ran once
    return complete


@pytest.mark.parametrize(("n_workers", "n_trials"), [(2, 6), (4, 8)])
def test_workers_finish_one_study_with_exactly_n_trials(study_env: dict, n_workers: int, n_trials: int) -> None:
    spec = write_toy_spec(study_env, n_trials)
    procs = {str(i): start_worker(study_env, spec, str(i)) for i in range(n_workers)}  # all at once
    wait_all(study_env, procs)
    study = load(study_env)
    complete = check_exactly_n(study, n_trials)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert all(t.system_attrs.get(SURPLUS_ATTR) for t in failed), "a trial failed"
    assert len({t.user_attrs["worker"] for t in complete}) >= 2, "one worker did all the work"


def test_killed_worker_trial_fails_and_is_retried(study_env: dict) -> None:
    """Two workers start together; one is killed with SIGKILL inside a trial (RUNNING, every coefficient
    suggested, its ``worker`` attr naming it); the other fails that trial through its stale heartbeat,
    retries it with the same coefficients, and finishes the study."""
    n_trials = 6
    spec = write_toy_spec(study_env, n_trials)
    procs = {tag: start_worker(study_env, spec, tag, *HEARTBEAT) for tag in ("victim", "rescuer")}
    victim = procs.pop("victim")
    killed = kill_in_a_trial(study_env, victim)
    wait_all(study_env, procs)
    study = load(study_env)
    check_exactly_n(study, n_trials)
    check_retried_elsewhere(study, killed, victim)


def kill_in_a_trial(env: dict, victim: subprocess.Popen,
                    before_kill: Callable[[], None] | None = None) -> optuna.trial.FrozenTrial:
    """SIGKILL ``victim`` once it runs a trial (RUNNING, its ``worker`` attr naming it; ``before_kill`` runs
    just before); the trial, checked to be still RUNNING after the kill."""
    me = f"{socket.gethostname()}:{victim.pid}"
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    killed = None
    while killed is None:
        assert victim.poll() is None, (env["dir"] / "worker-victim.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the victim never started a trial"
        if env["name"] in optuna.get_all_study_names(env["storage"]):
            mine = [t for t in load(env).get_trials(states=(TrialState.RUNNING,))
                    if t.user_attrs.get("worker") == me]
            if mine:
                if before_kill is not None:
                    before_kill()
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed = mine[0]
        time.sleep(0.05)
    state_now = load(env).trials[killed.number].state
    assert state_now == TrialState.RUNNING, f"trial {killed.number} ended before the kill ({state_now.name})"
    return killed


def check_retried_elsewhere(study: optuna.Study, killed: optuna.trial.FrozenTrial,
                            victim: subprocess.Popen) -> optuna.trial.FrozenTrial:
    """The killed trial FAIL (not surplus) and retried to completion by another worker with the same
    coefficients; every other failed trial retried too (a loaded machine can make a live worker miss the
    3 s grace, and its trial is then failed and retried the same way). The COMPLETE retry, the last of its
    line (a retry that was itself failed is retried again)."""
    me = f"{socket.gethostname()}:{victim.pid}"
    dead = study.trials[killed.number]
    assert dead.state == TrialState.FAIL and not dead.system_attrs.get(SURPLUS_ATTR)
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    (retry,) = [t for t in retries if t.state == TrialState.COMPLETE]
    assert retry.user_attrs["worker"] != me and retry.system_attrs["retry_history"][0] == killed.number
    assert retry.params == dead.params == killed.params  # the same coefficients, run by another worker
    retried = {n for t in study.get_trials(states=(TrialState.COMPLETE,)) for n in t.system_attrs.get("retry_history", [])}
    for t in study.get_trials(states=(TrialState.FAIL,)):
        assert t.system_attrs.get(SURPLUS_ATTR) or t.number in retried, f"trial {t.number} failed, never retried"
    return retry
