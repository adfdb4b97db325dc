"""Chaos on the real PostgreSQL server, driving the real ``safesearch run`` in subprocesses.

- A judge over HTTP (a real local server in this process) that answers HTTP 500 to every request of
  every third judged trial: those trials fail ("no item was judged"), each is told FAIL, reported on
  one stderr line and run again, and the study still ends with exactly its COMPLETE trials.
- Ctrl-C (SIGINT) or SIGTERM at seeded random moments, from start-up imports to after the end, ten
  times: every stop is one line and exit 130 (or 0 when it came too late), never a traceback, and
  never leaves a trial RUNNING; one more run then completes the study with every baseline, nothing
  lost.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from study_world import spec_dict, write_spec

from safesearch.storage import BASELINE_ATTR, count_states, open_storage, unretried_failures

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))
# Two cores: the workers must not fight the test (and each other) for threads. Without COLUMNS (and
# without a terminal, see run_command), rich writes stderr at its default 80 columns, as in any log.
# PYTHONFAULTHANDLER: a hung command is sent SIGABRT, which then dumps every thread's stack to stderr.
ENV = {**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONFAULTHANDLER": "1"}
RUN_TIMEOUT_S = 180  # a whole run takes 6-9 s here: a hang fails the test instead of blocking it
STOP_TIMEOUT_S = 45  # from the signal to the exit (a run that ignored it may finish its trials first)
BASELINES = ["lambda=0.5", "zero"]
INTERRUPTED = "error: interrupted"


# -- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture
def storage(postgres_url: str) -> Iterator[RDBStorage]:
    """The test database, opened once (no heartbeat: this process only reads and cleans up)."""
    rdb = open_storage(postgres_url, heartbeat_interval=None)
    yield rdb
    rdb.engine.dispose()


@pytest.fixture
def study_name(storage: RDBStorage) -> Iterator[str]:
    """A unique study name on the shared test database; the study is deleted afterwards."""
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    yield name
    if name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)


def load(storage: RDBStorage, name: str) -> optuna.Study | None:
    """The study, or None while no command has created it."""
    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def run_command(spec: Path, url: str, cwd: Path) -> subprocess.Popen:
    """``safesearch run SPEC --storage URL`` in a subprocess, stdout and stderr to files in ``cwd``, no
    terminal anywhere (as under a scheduler: rich then writes at 80 columns)."""
    cmd = [SAFESEARCH, "run", str(spec), "--storage", url, "--artifacts", str(cwd / "artifacts")]
    with open(cwd / "run.out", "w") as out, open(cwd / "run.err", "w") as err:  # the child keeps its copies
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=ENV)


def finish(p: subprocess.Popen, cwd: Path, timeout: float) -> tuple[int, str]:
    """Wait for ``p``; (exit code, stderr). Past ``timeout`` the test fails with the stacks of its threads
    (SIGABRT: the faulthandler's dump), and ``p`` is killed."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)  # the faulthandler's dump of every thread
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        pytest.fail(f"safesearch run hung for {timeout:.0f} s; stderr, then its threads:\n"
                    f"{(cwd / 'run.err').read_text()[-8000:]}")
    return p.returncode, (cwd / "run.err").read_text()


def excerpt(err: str) -> str:
    """Stderr for an assertion message: its start (where a crash says what it was) and its end."""
    return err if len(err) <= 6000 else f"{err[:2500]}\n[...]\n{err[-3500:]}"


def states(study: optuna.Study) -> str:
    """Every trial as ``number:STATE[baseline]``, for assertion messages."""
    def one(t: optuna.trial.FrozenTrial) -> str:
        baseline = t.user_attrs.get(BASELINE_ATTR)
        return f"{t.number}:{t.state.name}" + (f"[{baseline}]" if baseline else "")

    return " ".join(one(t) for t in study.get_trials(deepcopy=False))


def ran(study: optuna.Study | None) -> tuple[int, int]:
    """(trials that ran: COMPLETE or FAIL, trials failed by an interrupt)."""
    if study is None:
        return 0, 0
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return len(trials), sum("interrupted" in t.user_attrs.get("error", "") for t in trials)


def check_complete(study: optuna.Study, n_trials: int) -> None:
    """Exactly ``n_trials`` COMPLETE, each baseline COMPLETE once, nothing RUNNING or WAITING, and
    every failed trial queued again."""
    counts = count_states(study)
    assert counts[TrialState.COMPLETE] == n_trials, states(study)
    assert counts[TrialState.RUNNING] == counts[TrialState.WAITING] == 0, states(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baselines = sorted(t.user_attrs[BASELINE_ATTR] for t in complete if BASELINE_ATTR in t.user_attrs)
    assert baselines == BASELINES, states(study)
    # With their own values (a baseline retried before its first suggest keeps its enqueued ones).
    for t in complete:
        if BASELINE_ATTR in t.user_attrs:
            x = 0.0 if t.user_attrs[BASELINE_ATTR] == "zero" else 0.5
            assert {v for k, v in t.params.items() if k.startswith("safety.")} == {x}, (t.number, t.params)
            assert {v for k, v in t.params.items() if k.startswith("medical.")} == {0.0}, (t.number, t.params)
    assert unretried_failures(study) == [], states(study)


# -- a judge that fails every third trial -----------------------------------------------------------------


class FlakyJudge(ThreadingHTTPServer):
    """An OpenAI-compatible judge on 127.0.0.1: request k belongs to judged trial k // per_trial, and
    every third judged trial (index % 3 == 2) gets HTTP 500 for all its requests; the others 'safe'."""

    daemon_threads = True

    def __init__(self, per_trial: int) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.per_trial = per_trial
        self.requests = 0
        self.unexpected: list[str] = []  # requests that are not a chat completion for model m
        self.lock = threading.Lock()

    def verdict_for_next(self) -> int:
        """The HTTP status of the next request."""
        with self.lock:
            k, self.requests = self.requests, self.requests + 1
        return 500 if (k // self.per_trial) % 3 == 2 else 200


class _JudgeHandler(BaseHTTPRequestHandler):
    server: FlakyJudge

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path != "/v1/chat/completions" or body.get("model") != "m" or not body.get("messages"):
            self.server.unexpected.append(f"{self.path} {body}")
            self.send_error(404)
            return
        status = self.server.verdict_for_next()
        if status == 200:
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "safe"}}]}).encode()
        else:
            data = b'{"error": "judge overloaded"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def flaky_judge() -> Iterator[FlakyJudge]:
    """The judge server, serving in a thread for the test."""
    subset = 8
    server = FlakyJudge(subset)
    thread = threading.Thread(target=server.serve_forever, name="flaky-judge", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_judge_failing_every_third_trial_is_retried_to_exactly_n_trials(
    postgres_url: str, toyworld_small: Path, tmp_path: Path, storage: RDBStorage, study_name: str,
    flaky_judge: FlakyJudge,
) -> None:
    """Every third judged trial has no judged item: it is told FAIL with that error, reported on one
    stderr line and run again; the run still exits 0 with exactly n_trials COMPLETE, each baseline
    once, and no failure left unretried."""
    subset, n_trials = flaky_judge.per_trial, 6
    port = flaky_judge.server_address[1]
    suite = {
        "name": "chaos-http-harmful",
        "description": "Toy world, general harmful requests, judged over HTTP by a flaky local server.",
        "metric": "safety",
        "dataset": {"format": "jsonl", "path": "data/{split}/harmful_general.jsonl",
                    "split": "holdout"},
        "attack": "direct",
        "judge": {"type": "http", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "retries": 0,
                  "timeout": 5},
        "generation": {"max_new_tokens": 16},
    }
    suite_path = tmp_path / "chaos-http-harmful.yaml"
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    data = spec_dict(tmp_path, toyworld_small, subset=subset, n_trials=n_trials, name=study_name)
    data["objectives"][0] = {"name": "safety", "suite": str(suite_path), "subset": subset,
                             "holdout_subset": subset}
    spec = write_spec(tmp_path / "studies" / "chaos-judge.yaml", data)

    t0 = time.monotonic()
    code, err = finish(run_command(spec, postgres_url, tmp_path), tmp_path, RUN_TIMEOUT_S)
    print(f"judge run: {time.monotonic() - t0:.1f} s, {flaky_judge.requests} judge requests")
    assert code == 0, excerpt(err)
    assert "Traceback" not in err, excerpt(err)
    assert flaky_judge.unexpected == []

    study = load(storage, study_name)
    assert study is not None
    check_complete(study, n_trials)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert failed, states(study)
    # The judged trials were exactly the COMPLETE and the failed ones, every third one failing.
    assert flaky_judge.requests == subset * (n_trials + len(failed))
    assert len(failed) == (n_trials + len(failed)) // 3, states(study)
    lines = [line.strip() for line in err.splitlines()]
    for t in failed:
        assert "no item was judged" in t.user_attrs["error"], t.user_attrs
        (retry,) = [r for r in study.get_trials(deepcopy=False) if r.user_attrs.get("retry_of") == t.number]
        assert retry.params == t.params and retry.system_attrs["retry_history"][-1] == t.number
        line = f"trial {t.number} failed: {t.user_attrs['error']}; it runs again as trial {retry.number}"
        assert line in lines, f"no line {line!r} in stderr:\n{excerpt(err)}"


# -- Ctrl-C and SIGTERM at random moments ------------------------------------------------------------------


def wait_for_a_trial(p: subprocess.Popen, storage: RDBStorage, name: str, timeout: float) -> bool:
    """Poll until the study has a RUNNING trial (True) or ``p`` has ended (False)."""
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:  # not created yet
            study_id = None
        running = (TrialState.RUNNING,)
        if study_id is not None and storage.get_all_trials(study_id, deepcopy=False, states=running):
            return True
        time.sleep(0.05)
    return False


def test_interrupts_at_random_moments_lose_nothing(
    postgres_url: str, toyworld_small: Path, tmp_path: Path, storage: RDBStorage, study_name: str
) -> None:
    """Ten runs stopped by SIGINT or SIGTERM at seeded random moments (start-up imports, loading, study
    creation, mid-trial, between trials, the wind-down, after the end): each ends with exit 130 and the
    one last line ``error: interrupted`` (or exit 0 when it had already finished), no traceback, and no
    trial left RUNNING; a last run then completes the study with exactly n_trials COMPLETE, every
    baseline once (an interrupted baseline runs again), nothing RUNNING or WAITING, every interrupted
    trial queued again."""
    n_trials = 10
    # Measured on this 2-core machine: start-up (imports, loading the model, the study) 4-5 s, a trial
    # 0.1-0.3 s, a whole run 6-9 s (more when the machine is busy), of which the last second is the
    # interpreter's teardown; on a complete study a run ends after its start-up. Delays from the launch
    # alone would finish the study within a run or two and then only hit start-ups, so every other stop
    # is timed from the moment the run's first trial is RUNNING: 0-0.3 s later (in one of its first
    # trials, or between two; the very first stop 0-0.1 s later, in a baseline). The others are timed
    # from the launch, one in each fifth of 0.2-6.5 s (imports, loading, study creation, trials, the
    # wind-down, after the end).
    data = spec_dict(tmp_path, toyworld_small, subset=16, n_trials=n_trials, name=study_name, constraints=[],
                     max_retries=20)
    spec = write_spec(tmp_path / "studies" / "chaos-interrupts.yaml", data)
    rng = random.Random(20240531)
    launch_lo, launch_step = 0.2, (6.5 - 0.2) / 5
    landed = dict.fromkeys(("start-up", "mid-trial", "between or after trials", "after the end"), 0)
    for i in range(10):
        sig = signal.SIGTERM if i % 3 == 2 else signal.SIGINT
        from_trial = i % 2 == 0
        if from_trial:
            delay = rng.uniform(0.0, 0.1 if i == 0 else 0.3)
        else:
            delay = launch_lo + launch_step * (i // 2 + rng.random())
        ran_before, cut_before = ran(load(storage, study_name))
        t0 = time.monotonic()
        p = run_command(spec, postgres_url, tmp_path)
        if not from_trial or wait_for_a_trial(p, storage, study_name, RUN_TIMEOUT_S):
            time.sleep(delay)
            p.send_signal(sig)  # nothing when the run has already ended (and been reaped)
        code, err = finish(p, tmp_path, STOP_TIMEOUT_S)
        when = f"{delay:.2f} s after its first trial" if from_trial else f"{delay:.2f} s after the launch"
        where = f"stop {i}: {sig.name} {when}, exit {code} at {time.monotonic() - t0:.2f} s"
        # A negative code: the process died of the signal itself (no handler), without a line.
        assert code in (0, 130), f"{where}; stderr:\n{excerpt(err)}"
        assert "Traceback" not in err, f"{where}; stderr:\n{excerpt(err)}"
        if code == 130:
            last = [line for line in err.splitlines() if line.strip()][-1:]
            assert last == [INTERRUPTED], f"{where}; stderr:\n{excerpt(err)}"
        study = load(storage, study_name)
        if study is not None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            assert not running, f"{where}: trials left RUNNING: {states(study)}\nstderr:\n{excerpt(err)}"
        ran_after, cut_after = ran(study)
        phase = ("after the end" if code == 0 else "mid-trial" if cut_after > cut_before
                 else "between or after trials" if ran_after > ran_before else "start-up")
        landed[phase] += 1
        # Printed as it goes: pytest shows the stops so far when a later one fails.
        print(f"{where}: {phase}; " + (states(study) if study is not None else "no study yet"))
    print(f"interrupts landed: {landed}")

    code, err = finish(run_command(spec, postgres_url, tmp_path), tmp_path, RUN_TIMEOUT_S)
    assert code == 0, excerpt(err)
    assert "Traceback" not in err, excerpt(err)
    study = load(storage, study_name)
    assert study is not None
    check_complete(study, n_trials)
    cut = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
           if "interrupted" in t.user_attrs.get("error", "")]
    print(f"interrupted trials, all run again: {[t.number for t in cut]}; of them baselines: "
          f"{[t.user_attrs[BASELINE_ATTR] for t in cut if BASELINE_ATTR in t.user_attrs]}")
