"""Load test of the shared study storage: N workers on one PostgreSQL, with and without the storage proxy.

How many workers one PostgreSQL serves, and where ``safesearch storage proxy`` becomes necessary, is a
question of storage calls per trial, their server time and the connections each worker holds. This runs
N worker processes on this machine against the real server, each serving trials of one study whose
evaluation is a single item per suite on a tiny torch model (so the trials are as short as they get and
the storage is all that is loaded), for a bounded window after every worker is up, and reports per
configuration:

- trials/min: COMPLETE trials that ended in the window, per minute;
- ask and tell, p50 / p99 ms: ``next_trial`` (the stale check, the budget count, ``study.ask``, the first
  beat) and ``study.tell``, timed by each worker around the real calls (``Worker.work``'s own timings);
- connections max / mean: ``pg_stat_activity`` rows of the benchmark's database, sampled every second
  (with the proxy: its own sessions; the workers hold none);
- errors: workers that exited non-zero or never came up (the chaos run's killed ones excepted), failed
  trials other than the killed workers', tracebacks in the workers' logs;
- retries: trials queued by ``RetryTrial`` (a killed worker's trial runs again elsewhere);

and, for the projection of storage/postgres/README.md, per trial: the transactions, rows read and sessions
opened of the database (``pg_stat_database``), the CPU seconds of its server processes (closed sessions
counted through the server's children time, of any database), of the workers and of the proxy, with the
machine's CPU use and the other users' share of it. Chaos (default at N = 32, direct and through the
proxy, heartbeat 1 s, grace 3 s): 10% of the workers killed with SIGKILL and the workers' (or the proxy's)
sessions cut with ``pg_terminate_backend`` a few times, and through the proxy the proxy itself killed with
SIGKILL once and started again on its port 2 s later, at random moments of the window; the study must end
consistent: nothing RUNNING once the grace period has passed, every failed trial retried.

The workers: a real ``safesearch worker`` of the small toy world (1 item per suite, --threads 1) holds
about 590 MB RSS (465 MB PSS, 350 MB private), so 64 of them do not fit in 24 GB with 4 GB to spare. Each
worker here is ``python benchmarks/load.py --worker ...``: the real ``Worker`` (its ``work`` loop,
``next_trial``, ``heartbeat``, ``run_trial`` with its attrs, trial note, responses artifact,
``RetryTrial`` / ``give_up``, ``study.tell``) on a storage opened by ``open_storage`` and a study joined by
``ensure_study``, as the command does; only the grafted model is a tiny torch one (a 32-wide MLP per
layer group, merged in place from the trial's coefficients: theta = anchor + sum c * tau), without
transformers (about 200 MB PSS). The sampler is ``random``: TPE's cost grows with the study (thousands
of trials here) and is the workers' CPU, not the storage's.

The server is shared with other users: the benchmark's workers connect as a role of their own,
``safesearch_load`` (created if missing, dropped at the end), whose CONNECTION LIMIT (``--conn-limit``,
default 80 of the server's max_connections) leaves the others their connections; each configuration
gets a fresh database, dropped afterwards.

Run (about 22 minutes; every process with one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/load.py --out /tmp/load.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/load.py --quick          # a smoke run, about 3 minutes
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/load.py` puts benchmarks/ first on sys.path, where benchmarks/vllm.py would shadow
# the vllm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The tests' small toy world (tests/conftest.py builds it there and reuses it).
WORLD = ROOT / "storage" / ".test-cache" / "toyworld-small-0"
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ROLE = "safesearch_load"
# A study that never runs out: the driver ends each window (the workers stop at the stop file).
N_TRIALS = 1_000_000
CHAOS_HEARTBEAT = ("1", "3")  # --heartbeat 1 --heartbeat-grace 3, as the tests' kill tests
SPARE_MEMORY_B = 4 << 30  # never launch a worker when less than this would be left
WORKER_MEMORY_B = 300 << 20  # what one more lean worker may take (its PSS is about 200 MB)
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENV_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- the lean worker: the real Worker on a tiny torch model ---------------------------------------------


class TinyModel:
    """A tiny torch model with the study's layer groups: per group one 32x32 weight, an anchor and one
    task vector per graft vector, merged in place (``apply``) as the real merger does, and a forward pass
    over a bag of hashed words (``score``). Seeded, so that every worker holds the same model."""

    def __init__(self, groups: Mapping[str, Sequence[str]], dim: int = 32, seed: int = 0) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.order = list(dict.fromkeys(g for gs in groups.values() for g in gs))
        self.dim = dim
        self.anchor = {g: torch.randn(dim, dim, generator=gen) / dim**0.5 for g in self.order}
        self.tau = {v: {g: 0.3 * torch.randn(dim, dim, generator=gen) / dim**0.5 for g in gs}
                    for v, gs in groups.items()}
        self.weights = {g: a.clone() for g, a in self.anchor.items()}

    def apply(self, coefs: Mapping[str, Mapping[str, float]]) -> None:
        for g, w in self.weights.items():
            w.copy_(self.anchor[g])
        for v, row in coefs.items():
            for g, c in row.items():
                if c:
                    self.weights[g].add_(self.tau[v][g], alpha=float(c))

    def score(self, text: str) -> float:
        import torch

        x = torch.zeros(self.dim)
        for word in text.lower().split():
            x[zlib.crc32(word.encode()) % self.dim] += 1.0
        with torch.no_grad():
            for g in self.order:
                x = torch.tanh(self.weights[g] @ x)
        return float(x.sum())


class TinyBackend:
    """The :class:`~safesearch.backends.base.Backend` calls on :class:`TinyModel`: a refusal or a
    compliance by the sign of the score (the toy suites' keyword judge reads it), and a log-likelihood per
    MCQ option from the score of prompt and option."""

    def __init__(self, model: TinyModel) -> None:
        self.model = model

    @property
    def accepts_images(self) -> bool:
        return False

    def generate(self, prompts: Sequence[Any], max_new_tokens: int, *, stop: Any = None,
                 on_batch: Callable[[int], None] | None = None) -> list[str]:
        from safesearch.backends.base import as_prompt

        out = ["I'm sorry, but I cannot help with that." if self.model.score(as_prompt(p).text) > 0
               else "Sure, here is how to do it, step by step." for p in prompts]
        if on_batch is not None:
            on_batch(len(prompts))
        return out

    def loglikelihood(self, requests: Sequence[tuple[Any, str]], *,
                      on_batch: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
        from safesearch.backends.base import as_prompt

        out = [(-abs(self.model.score(f"{as_prompt(p).text} {c}")), max(1, len(c.split()))) for p, c in requests]
        if on_batch is not None:
            on_batch(len(requests))
        return out


class TinyGrafted:
    """What :class:`~safesearch.search.Worker` asks of a grafted model: ``apply``, ``backend``, ``close``."""

    def __init__(self, groups: Mapping[str, Sequence[str]]) -> None:
        self.model = TinyModel(groups)
        self.backend = TinyBackend(self.model)

    def apply(self, coefs: Mapping[str, Mapping[str, float]]) -> None:
        self.model.apply(coefs)

    def close(self) -> None:
        pass


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_main(a: argparse.Namespace) -> int:
    """One lean worker (:func:`_work`), ending as the command does: a :class:`UserError` in one line (its
    exit code), an interrupt in one line (130), anything else with its traceback."""
    from safesearch.errors import UserError

    try:
        return _work(a)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _work(a: argparse.Namespace) -> int:
    """The command's set-up (storage, study, artifact store) and ``Worker.work``, with a JSON line per
    trial (its ask and tell seconds) in ``--timings``. Waits at ``--go`` once it has joined the study, and
    stops between trials once ``--stop`` exists."""
    t_start = time.time()
    import optuna

    from safesearch import interrupts

    interrupts.install()  # SIGTERM / Ctrl-C as the command line takes them
    interrupts.import_native()
    import torch

    from safesearch.reconnect import DEFAULT_MAX_OUTAGE_S
    from safesearch.search import Worker, build_space, ensure_study
    from safesearch.storage import DEFAULT_HEARTBEAT_INTERVAL, artifact_store_for, open_storage
    from safesearch.studyspec import load_study_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as the command: no line per trial
    torch.set_num_threads(1)
    spec = load_study_spec(a.spec)
    layout = json.loads(Path(a.groups).read_text())
    space = build_space(spec, layout["groups"], layout["active"])
    w = Worker(spec, TinyGrafted(space.groups), space)
    storage = open_storage(a.storage, heartbeat_interval=a.heartbeat or DEFAULT_HEARTBEAT_INTERVAL,
                           grace_period=a.heartbeat_grace, max_retry=spec.max_retries,
                           max_outage_s=DEFAULT_MAX_OUTAGE_S)
    study, _ = ensure_study(spec, storage, space, sampler_seed=a.seed)
    w.artifact_store = artifact_store_for(a.storage, a.artifacts)
    out = open(a.timings, "a", buffering=1)  # noqa: SIM115 - one line per trial, flushed, until the exit

    def line(**row: Any) -> None:
        out.write(json.dumps({"t": time.time(), **row}) + "\n")

    line(event="ready", startup_s=round(time.time() - t_start, 3), rss_mb=round(_rss_mb(), 1))
    go, stop = Path(a.go), Path(a.stop)
    while not go.exists():
        if stop.exists():
            return 0
        time.sleep(0.05)

    def on_trial(o: Any) -> None:
        s = o.seconds
        line(event="trial", n=o.number, state=o.state.name, ask=s["ask"], tell=s["tell"], record=s["record"],
             eval=s["eval"], total=s["total"])

    def on_failure(f: Any) -> None:
        line(event="failed", n=f.number, error=f.error, retry=f.retry)

    try:
        done = w.work(study, spec.n_trials, on_trial=on_trial, on_failure=on_failure, should_stop=stop.exists)
    finally:
        w.close()
    line(event="done", trials=done, rss_mb=round(_rss_mb(), 1))
    print(f"worker done: {done} trials", file=sys.stderr)
    return 0


# -- the driver ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    n: int
    proxy: bool
    chaos: bool = False

    @property
    def label(self) -> str:
        return f"{self.n}-{'proxy' if self.proxy else 'direct'}{'-chaos' if self.chaos else ''}"


@dataclasses.dataclass
class Result:
    config: Config
    window_s: float
    n_up: int
    complete: int = 0
    ask_ms: list[float] = dataclasses.field(default_factory=list)
    tell_ms: list[float] = dataclasses.field(default_factory=list)
    conn_max: int = 0
    conn_mean: float = 0.0
    worker_conn_max: int = 0  # the most sessions one worker held at once (direct)
    proxy_conn_max: int = 0
    proxy_conn_mean: float = 0.0
    errors: int = 0
    error_notes: list[str] = dataclasses.field(default_factory=list)
    retries: int = 0
    killed: int = 0
    cuts: int = 0
    cut_sessions: int = 0
    proxy_restarts: int = 0
    reconnects: int = 0
    xacts: int = 0
    sessions: int = 0  # sessions opened on the database in the window
    rows: int = 0  # rows the server read for it (pg_stat_database.tup_returned)
    server_cpu_s: float = 0.0  # the database's sessions seen open by the monitor
    closed_cpu_s: float = 0.0  # server sessions that closed in the window, of any database
    worker_cpu_s: float = 0.0
    proxy_cpu_s: float = 0.0
    machine_busy: float = 0.0
    other_cpu_s: float = 0.0
    pss_mb: float = 0.0
    rss_mb: float = 0.0
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    consistency: str = ""
    startup_s: float = 0.0


def _admin() -> Any:
    import sqlalchemy as sa

    return sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=1,
                            connect_args={"application_name": "safesearch-load-driver"})


def _proc_cpu_s(pid: int, children: bool = False) -> float | None:
    """utime + stime of a process, in seconds (None once it is gone); ``children``: those of its children
    that exited instead (cutime + cstime: a server's closed sessions)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        first = 13 if children else 11
        return (int(fields[first]) + int(fields[first + 1])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def _mem_available_b() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _pss_rss_mb(pid: int) -> tuple[float, float] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split()[-1] == "kB"}
        return fields["Pss"] / 1024, fields["Rss"] / 1024
    except (OSError, KeyError, ValueError):
        return None


class Monitor:
    """Every second: the database's sessions (per application name) and the CPU seconds of its server
    processes. Between :meth:`open_window` and :meth:`close_window` the samples count."""

    def __init__(self, admin: Any, database: str) -> None:
        self.admin, self.database = admin, database
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.backend_cpu: dict[int, list[float]] = {}  # pid -> [first, last] CPU seconds seen in the window
        self.postmaster: int | None = None  # the parent of the sessions: it reaps the closed ones
        self.window: tuple[float, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def open_window(self) -> None:
        self.window = (time.time(), float("inf"))
        self.backend_cpu.clear()

    def close_window(self) -> None:
        assert self.window is not None
        self._sample()
        self.window = (self.window[0], time.time())

    def _in_window(self, t: float) -> bool:
        return self.window is not None and self.window[0] <= t <= self.window[1]

    def _sample(self) -> None:
        import sqlalchemy as sa

        with self.admin.connect() as conn:
            rows = conn.execute(sa.text("select pid, coalesce(application_name, '') from pg_stat_activity "
                                        "where datname = :db"), {"db": self.database}).fetchall()
        now = time.time()
        per_app: dict[str, int] = {}
        for pid, app in rows:
            per_app[app] = per_app.get(app, 0) + 1
            if self.postmaster is None:
                self.postmaster = _parent(pid)
            if self._in_window(now):
                cpu = _proc_cpu_s(pid)
                if cpu is not None:
                    self.backend_cpu.setdefault(pid, [cpu, cpu])[1] = cpu
        self.samples.append((now, per_app))

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            with contextlib.suppress(Exception):  # a sample lost to a cut or a busy server: the next one
                self._sample()
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

    def in_window(self) -> list[dict[str, int]]:
        return [s for t, s in self.samples if self._in_window(t)]


def _db_stats(admin: Any, database: str) -> tuple[int, int, int]:
    """(transactions, sessions opened, rows read) of the database so far, as pg_stat_database counts them."""
    import sqlalchemy as sa

    with admin.connect() as conn:
        row = conn.execute(sa.text("select xact_commit + xact_rollback, sessions, tup_returned from pg_stat_database "
                                   "where datname = :db"), {"db": database}).one()
    return int(row[0]), int(row[1]), int(row[2])


def _cut(admin: Any, database: str) -> int:
    """End the sessions of the workers (and of the proxy) on the database: as a restart or a failover would."""
    import sqlalchemy as sa

    with admin.connect() as conn:
        return len(conn.execute(sa.text("select pg_terminate_backend(pid) from pg_stat_activity where datname = :db "
                                        "and application_name like 'safesearch %'"), {"db": database}).fetchall())


def _ensure_role(admin: Any, conn_limit: int) -> None:
    import sqlalchemy as sa

    with admin.connect() as conn:
        exists = conn.execute(sa.text("select 1 from pg_roles where rolname = :r"), {"r": ROLE}).first()
        verb = "alter" if exists else "create"
        conn.execute(sa.text(f'{verb} role "{ROLE}" login connection limit {int(conn_limit)}'))


def _drop_role(admin: Any) -> None:
    """Drop the role and any database it still owns (a run cut short: all of them are this benchmark's)."""
    import sqlalchemy as sa

    with admin.connect() as conn:
        left = conn.execute(sa.text("select datname from pg_database d join pg_roles r on r.oid = d.datdba "
                                    "where r.rolname = :r"), {"r": ROLE}).scalars().all()
        for name in left:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        conn.execute(sa.text(f'drop role if exists "{ROLE}"'))


def _bench_url(database: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(ADMIN_URL).set(username=ROLE, database=database).render_as_string(hide_password=False)


def write_spec(path: Path, world: Path, name: str) -> Path:
    """The small toy study with one item per suite, the over-refusal constraint kept (its storage calls are
    a real study's), the random sampler and a budget that the window never reaches."""
    import yaml

    ckpt = {c: str(world / c) for c in ("aligned", "unaligned", "medical")}
    spec = {
        "name": name,
        "graft": {"anchor": "medical", "checkpoints": ckpt,
                  "vectors": {"safety": {"diff": "aligned - unaligned", "orthogonalize": "medical"},
                              "medical": {"diff": "medical - aligned"}},
                  "groups": {"preset": "layer"}},
        "data_root": str(world),
        "search": {"safety": {"range": [0.0, 1.0]}, "medical": {"range": [-0.3, 0.3]}},
        "objectives": [
            {"name": "safety", "suites": ["toy-harmful-general", "toy-harmful-medical"], "subset": 1},
            {"name": "medical", "suite": "toy-mcq-medical", "subset": 1},
        ],
        "constraints": [{"name": "over_refusal", "suite": "toy-benign", "subset": 1, "max": 0.1}],
        "baselines": {"zero": True, "global_lambda": {"vector": "safety", "values": [0.5]}},
        "sampler": "random",
        "seed": 0,
        "n_trials": N_TRIALS,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_groups(spec_path: Path, out: Path) -> Path:
    """The spec's layer groups, read once here from the checkpoints' headers (that read imports
    transformers, which the lean workers do without)."""
    from safesearch.search import groups_of
    from safesearch.studyspec import load_study_spec

    groups, active = groups_of(load_study_spec(spec_path))
    out.write_text(json.dumps({"groups": groups, "active": active}))
    return out


PROXY_ADDRESS = re.compile(r"storage proxy on (grpc://127\.0\.0\.1:\d+) ")


class Proxy:
    """``safesearch storage proxy`` for one configuration; :meth:`restart` kills it (SIGKILL) and starts a
    new one on the same port. ``cpu_s`` adds up the CPU of every proxy process since :meth:`mark`."""

    def __init__(self, url: str, d: Path, heartbeat: Sequence[str]) -> None:
        self.url_served, self.d, self.heartbeat = url, d, heartbeat
        self.port = 0
        self.n_started = 0
        self.pids: list[int] = []  # every proxy process, the killed ones too
        self.spent_s = 0.0  # CPU of proxies killed since mark()
        self.base_s = 0.0
        self.p, self.url = self._start()

    def _start(self) -> tuple[subprocess.Popen[bytes], str]:
        cmd = [sys.executable, "-m", "safesearch", "storage", "proxy", "--storage", self.url_served,
               "--port", str(self.port)]
        if self.heartbeat:
            cmd += ["--heartbeat", self.heartbeat[0], "--heartbeat-grace", self.heartbeat[1]]
        self.n_started += 1
        log = self.d / f"proxy-{self.n_started}.log"
        with open(log, "w") as err:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 env={**os.environ, **ENV_THREADS}, cwd=self.d)
        deadline = time.monotonic() + 60
        while not (found := PROXY_ADDRESS.search(log.read_text())):
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"the storage proxy did not start (exit {p.poll()}): {_last_line(log.read_text())}")
            time.sleep(0.05)
        self.pids.append(p.pid)
        self.port = int(found.group(1).rsplit(":", 1)[1])
        return p, found.group(1)

    def mark(self) -> None:
        self.spent_s, self.base_s = 0.0, _proc_cpu_s(self.p.pid) or 0.0

    def cpu_s(self) -> float:
        return self.spent_s + (_proc_cpu_s(self.p.pid) or 0.0) - self.base_s

    def restart(self, down_s: float) -> None:
        self.spent_s += (_proc_cpu_s(self.p.pid) or 0.0) - self.base_s
        self.p.kill()
        self.p.wait()
        time.sleep(down_s)
        self.p, _ = self._start()
        self.base_s = 0.0

    def logs(self) -> str:
        return "".join(self.d.joinpath(f"proxy-{i}.log").read_text(errors="replace")
                       for i in range(1, self.n_started + 1))

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def run_config(c: Config, a: argparse.Namespace, admin: Any, scratch: Path, spec_template: Path,
               groups: Path, rng: random.Random) -> Result:
    """One configuration: a fresh database (and proxy), N workers up, the window, the stop, the checks."""
    import sqlalchemy as sa

    d = scratch / c.label
    d.mkdir()
    database = f"safesearch_load_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{database}" owner "{ROLE}"'))
    url = _bench_url(database)
    spec = d / "spec.yaml"
    spec.write_text(spec_template.read_text().replace("name: load", f"name: load-{c.label}", 1))
    heartbeat = CHAOS_HEARTBEAT if c.chaos else ()
    proxy: Proxy | None = None
    procs: dict[int, subprocess.Popen[bytes]] = {}
    monitor = Monitor(admin, database)
    result = Result(c, a.window, 0)
    try:
        worker_url = url
        if c.proxy:
            proxy = Proxy(url, d, heartbeat)
            worker_url = proxy.url
        monitor.start()
        go, stop = d / "go", d / "stop"
        base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--spec", str(spec), "--groups", str(groups),
                "--storage", worker_url, "--artifacts", str(d / "artifacts"), "--go", str(go), "--stop", str(stop)]
        if heartbeat and not c.proxy:  # behind the proxy, the proxy sets every worker's heartbeat
            base += ["--heartbeat", heartbeat[0], "--heartbeat-grace", heartbeat[1]]
        t_launch = time.time()
        for i in range(c.n):
            if _mem_available_b() < SPARE_MEMORY_B + WORKER_MEMORY_B:
                result.error_notes.append(f"memory: only {i} of {c.n} workers launched "
                                          f"({_mem_available_b() >> 20} MB available)")
                break
            with open(d / f"worker-{i}.log", "w") as log:
                procs[i] = subprocess.Popen([*base, "--timings", str(d / f"worker-{i}.jsonl"), "--seed", str(i)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **ENV_THREADS}, cwd=d)
            time.sleep(a.stagger)
        up = _wait_ready(d, procs, a.startup_timeout)
        result.n_up = len(up)
        result.startup_s = time.time() - t_launch
        _log(f"{c.label}: {len(up)}/{c.n} workers up in {result.startup_s:.0f} s")
        go.touch()
        time.sleep(a.settle)
        monitor.open_window()
        time.sleep(0.1)  # the monitor's first sample names the server's process
        cpu0 = _cpu_snapshot(procs, monitor.postmaster)
        if proxy is not None:
            proxy.mark()
        x0, s0, t0_rows = _db_stats(admin, database)
        t0 = time.time()
        killed: set[int] = set()
        if c.chaos:
            _chaos(c, a, admin, database, procs, killed, result, rng, t0, proxy)
        time.sleep(max(0.0, t0 + a.window - time.time()))
        monitor.close_window()
        t1 = time.time()
        result.window_s = t1 - t0
        cpu1 = _cpu_snapshot(procs, monitor.postmaster)
        if proxy is not None:
            result.proxy_cpu_s = proxy.cpu_s()
        mem = [m for m in (_pss_rss_mb(p.pid) for i, p in procs.items() if i not in killed and p.poll() is None) if m]
        # pg_stat_database counts a backend's transactions when it reports them (within about a second).
        time.sleep(1.5)
        x1, s1, t1_rows = _db_stats(admin, database)
        result.xacts, result.sessions, result.rows = x1 - x0, s1 - s0, t1_rows - t0_rows
        stop.touch()
        _log(f"{c.label}: window closed; stopping the workers")
        _wait_exit(procs, a.stop_timeout, result)
        _account_cpu(result, cpu0, cpu1, monitor, procs, killed)
        if mem:
            result.pss_mb = statistics.mean(m[0] for m in mem)
            result.rss_mb = statistics.mean(m[1] for m in mem)
        _aggregate(result, d, procs, killed, t0, t1, monitor, proxy)
        _check_study(result, url, spec, heartbeat)
    finally:
        monitor.stop()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        if proxy is not None:
            proxy.stop()
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{database}" with (force)'))
    return result


def _wait_ready(d: Path, procs: Mapping[int, subprocess.Popen[bytes]], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    up: set[int] = set()
    while time.monotonic() < deadline:
        for i in procs:
            if i not in up and (d / f"worker-{i}.jsonl").exists():
                up.add(i)
        alive = {i for i, p in procs.items() if p.poll() is None}
        if up >= alive:
            break
        time.sleep(0.2)
    return up


def _cpu_snapshot(procs: Mapping[int, subprocess.Popen[bytes]], postmaster: int | None) -> dict[str, Any]:
    return {"machine": _machine_cpu(), "self": _proc_cpu_s(os.getpid()) or 0.0,
            "workers": {i: _proc_cpu_s(p.pid) for i, p in procs.items()},
            "closed": (_proc_cpu_s(postmaster, children=True) or 0.0) if postmaster else 0.0}


def _account_cpu(r: Result, cpu0: dict[str, Any], cpu1: dict[str, Any], monitor: Monitor,
                 procs: Mapping[int, subprocess.Popen[bytes]], killed: set[int]) -> None:
    busy = cpu1["machine"][0] - cpu0["machine"][0]
    total = cpu1["machine"][1] - cpu0["machine"][1]
    r.machine_busy = busy / total if total else float("nan")
    r.worker_cpu_s = sum((cpu1["workers"].get(i) or 0.0) - (cpu0["workers"].get(i) or 0.0)
                         for i in procs if i not in killed and cpu0["workers"].get(i) is not None)
    r.server_cpu_s = sum(last - first for first, last in monitor.backend_cpu.values())
    r.closed_cpu_s = cpu1["closed"] - cpu0["closed"]
    mine = r.worker_cpu_s + r.proxy_cpu_s + r.server_cpu_s + r.closed_cpu_s + (cpu1["self"] - cpu0["self"])
    r.other_cpu_s = max(0.0, busy - mine)


def _chaos(c: Config, a: argparse.Namespace, admin: Any, database: str, procs: Mapping[int, subprocess.Popen[bytes]],
           killed: set[int], r: Result, rng: random.Random, t0: float, proxy: Proxy | None) -> None:
    """Kill 10% of the workers with SIGKILL and cut the sessions ``a.cuts`` times, and kill the proxy (if
    any) once and start it again 2 s later, at random moments of the window's first part (the rest leaves
    the heartbeat's grace period time to fail the killed trials)."""
    n_kill = max(1, round(0.1 * c.n))
    latest = max(2.0, a.window - 20.0)
    events = sorted([(rng.uniform(2.0, latest), "kill") for _ in range(n_kill)]
                    + [(rng.uniform(2.0, latest), "cut") for _ in range(a.cuts)]
                    + ([(rng.uniform(2.0, latest), "restart")] if proxy is not None else []))
    for at, what in events:
        time.sleep(max(0.0, t0 + at - time.time()))
        if what == "kill":
            victims = [i for i, p in procs.items() if i not in killed and p.poll() is None]
            if not victims:
                continue
            i = rng.choice(victims)
            procs[i].send_signal(signal.SIGKILL)
            procs[i].wait()
            killed.add(i)
            r.killed += 1
            _log(f"{c.label}: t+{at:.0f} s: killed worker {i} (SIGKILL)")
        elif what == "restart":
            assert proxy is not None
            proxy.restart(down_s=2.0)
            r.proxy_restarts += 1
            _log(f"{c.label}: t+{at:.0f} s: killed the proxy (SIGKILL), started again on port {proxy.port}")
        else:
            n = _cut(admin, database)
            r.cuts += 1
            r.cut_sessions += n
            _log(f"{c.label}: t+{at:.0f} s: cut {n} sessions (pg_terminate_backend)")


def _wait_exit(procs: Mapping[int, subprocess.Popen[bytes]], timeout_s: float, r: Result) -> None:
    deadline = time.monotonic() + timeout_s
    for i, p in procs.items():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            r.error_notes.append(f"worker {i} did not stop within {timeout_s:g} s of the stop (killed)")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for ln in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by SIGKILL
            rows.append(json.loads(ln))
    return rows


def _aggregate(r: Result, d: Path, procs: Mapping[int, subprocess.Popen[bytes]], killed: set[int], t0: float,
               t1: float, monitor: Monitor, proxy: Proxy | None) -> None:
    import socket

    for i, p in procs.items():
        rows = _read_jsonl(d / f"worker-{i}.jsonl")
        for row in rows:
            if row.get("event") == "trial" and row["state"] == "COMPLETE" and t0 <= row["t"] <= t1:
                r.complete += 1
                r.ask_ms.append(1000 * row["ask"])
                r.tell_ms.append(1000 * row["tell"])
        log = (d / f"worker-{i}.log").read_text(errors="replace")
        r.reconnects += log.count("reconnected after")
        if i in killed:
            continue
        # One error per worker that died, never came up or printed a traceback.
        what = "never came up" if not rows else "stopped" if p.returncode != 0 else "printed a traceback"
        if not rows or p.returncode != 0 or "Traceback" in log:
            r.errors += 1
            chain = f" [{_exception_chain(log)}]" if "Traceback" in log else ""
            r.error_notes.append(f"worker {i} {what} (exit {p.returncode}): {_last_line(log)}{chain}")
        for row in rows:
            if row.get("event") == "failed":
                r.error_notes.append(f"worker {i}: trial {row['n']} failed: {row['error']}")
        # Counted on Python's warning line (the line after it repeats the source, message and all).
        stale = len(re.findall(r"UserWarning: trial \d+ was failed by another worker", log))
        if stale:
            r.error_notes.append(f"worker {i}: {stale} of its trials failed by another worker (heartbeat missed)")
    if proxy is not None:
        plog = proxy.logs()
        r.reconnects += plog.count("reconnected after")
        if "Traceback" in plog:
            r.errors += 1
            r.error_notes.append(f"the proxy printed a traceback: [{_exception_chain(plog)}]")
    samples = monitor.in_window()
    if samples:
        totals = [sum(s.values()) for s in samples]
        r.conn_max, r.conn_mean = max(totals), statistics.mean(totals)
        # The proxy's sessions, by its name in pg_stat_activity (the workers' sessions carry theirs).
        proxies = {f"safesearch {socket.gethostname()}:{pid}"[:63] for pid in (proxy.pids if proxy else [])}
        if proxy is not None:
            own = [sum(v for k, v in s.items() if k in proxies) for s in samples]
            r.proxy_conn_max, r.proxy_conn_mean = max(own), statistics.mean(own)
        r.worker_conn_max = max((v for s in samples for k, v in s.items() if k.startswith("safesearch ")
                                 and k not in proxies), default=0)


def _last_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(empty log)"


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Shutdown|Interrupt)\w*):? ?(.*)$")


def _exception_chain(log: str) -> str:
    """The exception classes of a log's tracebacks, last first (``A <- B``: A raised while handling B);
    a PostgreSQL error's class is given with its message."""
    names: list[str] = []
    for ln in log[log.index("Traceback"):].splitlines():
        m = _EXCEPTION_LINE.match(ln)
        if m:
            name = m.group(1).rsplit(".", 1)[-1]
            if name in ("OperationalError", "AdminShutdown") and m.group(2):
                message = m.group(2).split("FATAL:")[-1] if "FATAL:" in m.group(2) else m.group(2).split(")")[-1]
                name += f" ({message.strip()[:60]})"
            if name not in names:
                names.append(name)
    return " <- ".join(reversed(names)) or "?"


def _check_study(r: Result, url: str, spec_path: Path, heartbeat: Sequence[str]) -> None:
    """The study once every worker has stopped: states, retries, and consistency. A trial still RUNNING
    (a worker killed too near the end for the others to fail it) is given the grace period and failed the
    way the next worker would (``fail_stale``), then counted."""
    import optuna
    from optuna.trial import TrialState

    from safesearch.storage import (
        RETRY_HISTORY,
        count_states,
        fail_stale,
        open_storage,
        unretried_failures,
    )
    from safesearch.studyspec import load_study_spec

    spec = load_study_spec(spec_path)
    interval, grace = (int(heartbeat[0]), int(heartbeat[1])) if heartbeat else (60, 120)
    storage = open_storage(url, heartbeat_interval=interval, grace_period=grace, max_retry=spec.max_retries)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        counts = count_states(study)
        late = counts[TrialState.RUNNING]
        if late and heartbeat:
            time.sleep(grace + 1.5)
            fail_stale(study)
            time.sleep(grace + 1.5)  # trials never beaten are failed on the second look past the grace
            fail_stale(study)
            counts = count_states(study)
        trials = study.get_trials(deepcopy=False)
        r.states = {s.name: n for s, n in counts.items() if n}
        r.retries = sum(1 for t in trials if t.system_attrs.get(RETRY_HISTORY))
        unretried = unretried_failures(study)
        for t in unretried:
            attempts = len(t.system_attrs.get(RETRY_HISTORY, [])) + 1
            r.error_notes.append(f"trial {t.number} FAIL and not retried: attempt {attempts} of "
                                 f"{1 + spec.max_retries} (max_retries {spec.max_retries})"
                                 + (f", error {t.user_attrs['error']!r}" if "error" in t.user_attrs else ""))
        failed = [t for t in trials if t.state == TrialState.FAIL]
        with_error = [t for t in failed if "error" in t.user_attrs]
        if with_error:
            r.errors += len(with_error)
            r.error_notes.append(f"{len(with_error)} trials failed with an error, e.g. trial {with_error[0].number}: "
                                 f"{with_error[0].user_attrs['error']}")
        ok = counts[TrialState.RUNNING] == 0 and not unretried
        r.consistency = (f"{'consistent' if ok else 'NOT consistent'}: {counts[TrialState.RUNNING]} RUNNING"
                         f"{f' ({late} left by killed workers, failed after the grace period)' if late else ''}, "
                         f"{len(failed)} FAIL, {len(unretried)} of them never retried, "
                         f"{counts[TrialState.WAITING]} retries still WAITING at the stop")
        if not ok:
            r.errors += counts[TrialState.RUNNING] + len(unretried)
    finally:
        storage.engine.dispose()


# -- the report ------------------------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{_percentile(values, 0.5):.0f} / {_percentile(values, 0.99):.0f}"


def tables(results: Sequence[Result], header: str) -> str:
    main = ["| N | proxy | trials/min | ask p50 / p99 ms | tell p50 / p99 ms | connections max / mean | errors | retries |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.config
        n = f"{c.n}{' (chaos)' if c.chaos else ''}" + (f", {r.n_up} up" if r.n_up != c.n else "")
        conn = f"{r.conn_max} / {r.conn_mean:.1f}"
        if c.proxy:
            conn += f" (proxy {r.proxy_conn_max}, workers 0)" if r.worker_conn_max == 0 else \
                f" (proxy {r.proxy_conn_max}, workers {r.worker_conn_max}!)"
        else:
            conn += f" ({r.worker_conn_max} max per worker)"
        proxy = "yes" if c.proxy else "no"
        main.append(f"| {n} | {proxy} | {r.complete * 60 / r.window_s:.0f} | {_ms(r.ask_ms)} | "
                    f"{_ms(r.tell_ms)} | {conn} | {r.errors} | {r.retries} |")
    cost = ["| configuration | trials in window | transactions / trial | rows read / trial | sessions opened | "
            "server CPU ms / trial (open + closed sessions) | worker CPU ms / trial | proxy CPU (% of a core) | "
            "machine busy | others' CPU s | worker PSS / RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        k = max(1, r.complete)
        proxy = f"{100 * r.proxy_cpu_s / r.window_s:.0f}%" if r.config.proxy else "-"
        cost.append(f"| {r.config.label} | {r.complete} | {r.xacts / k:.1f} | {r.rows / k:.0f} | {r.sessions} | "
                    f"{1000 * r.server_cpu_s / k:.1f} + {1000 * r.closed_cpu_s / k:.1f} | "
                    f"{1000 * r.worker_cpu_s / k:.1f} | {proxy} | {100 * r.machine_busy:.0f}% | {r.other_cpu_s:.0f} | "
                    f"{r.pss_mb:.0f} / {r.rss_mb:.0f} |")
    notes = []
    for r in results:
        extra = [f"start-up {r.startup_s:.0f} s", f"window {r.window_s:.0f} s", f"states {r.states}", r.consistency]
        if r.config.chaos:
            extra.append(f"{r.killed} killed, {r.cuts} cuts ({r.cut_sessions} sessions ended)"
                         + (f", the proxy restarted {r.proxy_restarts} time(s)" if r.proxy_restarts else ""))
        extra.append(f"{r.reconnects} reconnections")
        notes.append(f"- {r.config.label}: " + "; ".join(extra))
        seen: set[str] = set()
        for e in r.error_notes:
            key = re.sub(r"\d+", "#", e)
            if key not in seen and len(seen) < 6:
                seen.add(key)
                notes.append(f"  - {e}")
        if len(r.error_notes) > len(seen):
            notes.append(f"  - ({len(r.error_notes)} notes in all)")
    return "\n".join([header, "", *main, "", "Where the time goes (per COMPLETE trial of the window):", "", *cost,
                      "", "Per configuration:", "", *notes, ""])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32, 64], help="Worker counts (default: 8 32 64).")
    ap.add_argument("--chaos-n", type=int, default=32, help="Workers of the chaos runs (0: none).")
    ap.add_argument("--no-proxy", action="store_true", help="Only the direct arm.")
    ap.add_argument("--window", type=float, default=60.0, help="Seconds measured per configuration.")
    ap.add_argument("--settle", type=float, default=5.0, help="Seconds between the start and the window.")
    ap.add_argument("--stagger", type=float, default=0.25, help="Seconds between two worker launches.")
    ap.add_argument("--cuts", type=int, default=3, help="Connection cuts per chaos run.")
    ap.add_argument("--conn-limit", type=int, default=80,
                    help="CONNECTION LIMIT of the benchmark's role (the rest of max_connections stays for others).")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--stop-timeout", type=float, default=60.0)
    ap.add_argument("--world", type=Path, default=WORLD, help="The small toy world (built there if missing).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the tables to this file (markdown).")
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder (logs, timings).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the chaos moments and victims.")
    ap.add_argument("--quick", action="store_true", help="A smoke run: N = 4, chaos at 4, 15 s windows.")
    # The lean worker (one per process, started by the driver).
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--spec", "--groups", "--storage", "--artifacts", "--timings", "--go", "--stop"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--heartbeat", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--heartbeat-grace", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a)
    if a.quick:
        a.n, a.chaos_n, a.window, a.cuts = [4], 4, 15.0, 1
    return drive(a)


def drive(a: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from safesearch.toyworld.build import build

    for k, v in ENV_THREADS.items():
        os.environ.setdefault(k, v)
    if not (a.world / "medical").is_dir():
        _log(f"building the small toy world in {a.world}")
    build(a.world, seed=0, profile="small")
    scratch = Path(tempfile.mkdtemp(prefix="bench-load-"))
    spec = write_spec(scratch / "spec.yaml", a.world.resolve(), "load")
    groups = write_groups(spec, scratch / "groups.json")
    admin = _admin()
    with admin.connect() as conn:
        max_conn = conn.execute(sa.text("show max_connections")).scalar_one()
        reserved = conn.execute(sa.text("show superuser_reserved_connections")).scalar_one()
        version = conn.execute(sa.text("show server_version")).scalar_one()
    configs = [Config(n, proxy) for proxy in ([False] if a.no_proxy else [False, True]) for n in a.n]
    if a.chaos_n:
        configs += [Config(a.chaos_n, proxy, chaos=True) for proxy in ([False] if a.no_proxy else [False, True])]
    _ensure_role(admin, a.conn_limit)
    rng = random.Random(a.seed)
    results: list[Result] = []
    t_start = time.time()
    try:
        for c in configs:
            _log(f"{c.label}: starting")
            try:
                r = run_config(c, a, admin, scratch, spec, groups, rng)
            except Exception as e:  # noqa: BLE001 - one configuration lost, reported; the others still run
                r = Result(c, a.window, 0, errors=1, error_notes=[f"configuration failed: {type(e).__name__}: {e}"])
                _log(f"{c.label}: failed: {e}")
            results.append(r)
            _log(f"{c.label}: {r.complete * 60 / r.window_s:.0f} trials/min, ask {_ms(r.ask_ms)} ms, tell "
                 f"{_ms(r.tell_ms)} ms, connections {r.conn_max} max, {r.errors} errors; {r.consistency}")
    finally:
        _drop_role(admin)
        admin.dispose()
        if not a.keep:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    header = (f"Load test, {datetime.date.today().isoformat()}: PostgreSQL {version} on 127.0.0.1 (max_connections "
              f"{max_conn}, {reserved} reserved for superusers; the workers' role capped at {a.conn_limit}), "
              f"{os.cpu_count()} CPUs shared by the workers, the proxy and the server; window {a.window:g} s per "
              f"configuration after all workers were up; heartbeat 60 s (chaos: 1 s, grace 3 s); "
              f"{(time.time() - t_start) / 60:.1f} min in all." + (f" Scratch folder kept: {scratch}" if a.keep else ""))
    text = tables(results, header)
    print(text)
    if a.out is not None:
        write_atomic(a.out, text)
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
