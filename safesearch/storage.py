"""Where studies live: Optuna's RDB storage on SQLite (one worker) or PostgreSQL (many workers).

Every command that touches a study goes through :func:`open_storage` and :func:`open_study`; workers
coordinate through Optuna's storage only (no queue, lock service or coordinator of our own).

URLs (:func:`resolve_url`): ``--storage URL``, else ``$SAFESEARCH_STORAGE``, else
:data:`DEFAULT_STORAGE_URL` (``sqlite:///storage/safesearch.db``, relative to the working directory).
A value without ``://`` is a SQLite file path. PostgreSQL: ``postgresql+psycopg://`` (psycopg 3),
``postgresql+psycopg2://``; a bare ``postgresql://`` means psycopg 3. A password in a URL is never
printed: messages use :func:`mask_url`.

Many workers:

- Tables: Optuna creates its tables (and stamps its schema version) when a storage opens. Workers
  started at the same moment would race on that on PostgreSQL (duplicate ``CREATE TABLE`` / type,
  two version rows), so the first initialisation runs under a PostgreSQL advisory lock held by the
  database itself; once the schema is stamped, opening takes no lock.
- Study: :func:`open_study` creates it or loads it (``load_if_exists``; a concurrent creation is
  Optuna's ``DuplicatedStudyError``, which it turns into a load) and refuses a study of that name
  with other directions (one-line :class:`UserError`).
- Connections: one worker uses one connection for its trials and one for the heartbeat thread; the
  pool is ``pool_size=2, max_overflow=2`` with ``pool_pre_ping``: at most 4 per worker, so PostgreSQL's
  default ``max_connections = 100`` serves about 25 workers at full use. Past that, workers take
  ``grpc://HOST:PORT``: a storage proxy (:mod:`safesearch.proxy`, heartbeats included) holds the
  connections for all of them. A lost connection is waited for (:mod:`safesearch.reconnect`).
- Dead workers: with a heartbeat (default every 60 s, grace twice that) a trial whose worker stopped
  beating is marked FAIL by the next worker that looks (:func:`fail_stale`, called by Optuna's
  ``study.optimize`` and by :func:`next_trial`), and :class:`RetryTrial`
  queues a copy (same params, system attrs ``failed_trial`` and ``retry_history``) that the next
  ``study.ask()`` of any worker picks up. An ask/tell loop must run each trial inside
  :func:`heartbeat` (``study.optimize`` does that itself).
- Budget: :func:`next_trial` is the ask of a worker in a study of ``n_trials``: it never lets the
  study go past ``n_trials`` COMPLETE trials, however many workers race, and waits (rather than
  exits) while another worker's running trial may still fail and need a retry.

Artifacts (:func:`artifact_store_for`): a file store, ``<db dir>/artifacts`` next to a SQLite file,
``storage/artifacts`` for a server URL, or any path given (a shared file system for a cluster).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.artifacts import FileSystemArtifactStore
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState

from safesearch import interrupts
from safesearch.errors import UserError
from safesearch.proxy import is_proxy_url
from safesearch.reconnect import (
    DEFAULT_MAX_OUTAGE_S,
    Backoff,
    Heartbeat,
    ReconnectingStorage,
    StorageFailure,
    StorageOutage,
    driver_message,
    grace_period_s,
    impatient,
)
from safesearch.redact import mask_url
from safesearch.studyspec import DEFAULT_MAX_RETRIES

DEFAULT_STORAGE_URL = "sqlite:///storage/safesearch.db"
STORAGE_ENV = "SAFESEARCH_STORAGE"
ARTIFACTS_ENV = "SAFESEARCH_ARTIFACTS"
DEFAULT_HEARTBEAT_INTERVAL = 60
# Per worker: the trial loop plus the heartbeat thread; overflow covers the odd extra reader.
POOL_KWARGS: dict[str, Any] = {"pool_size": 2, "max_overflow": 2, "pool_pre_ping": True, "pool_recycle": 3600}
CONNECT_TIMEOUT_S = 10
# TCP keepalives (libpq's): a server that vanished without closing the socket (a failover, a cut network)
# is noticed within about a minute instead of the kernel's two hours, and the call fails and is retried.
KEEPALIVES: dict[str, int] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                              "keepalives_count": 3}
# A fixed key for pg_advisory_lock: "safesearch schema init".
_SCHEMA_LOCK_KEY = zlib.crc32(b"safesearch:optuna-schema-init")
# System attr set on a trial that was asked for but fell beyond the study's budget (see next_trial).
SURPLUS_ATTR = "safesearch:surplus"
# Optuna's own system attr of a retried trial: the numbers of every earlier attempt, first one first.
RETRY_HISTORY = "retry_history"
# Optuna's system attr of an enqueued trial: the parameter values it will suggest.
FIXED_PARAMS = "fixed_params"
# User attr naming a baseline trial (``zero``, ``lambda=0.5``): kept by its retries.
BASELINE_ATTR = "baseline"
_POSTGRES_DRIVERS = {"psycopg", "psycopg2"}


def resolve_url(url: str | None = None) -> str:
    """The storage URL to use: ``url``, else ``$SAFESEARCH_STORAGE``, else the SQLite default.

    A value without ``://`` is taken as a SQLite file path; ``postgresql://`` gets the psycopg 3
    driver (``postgresql+psycopg://``), which is what this project installs. ``grpc://HOST:PORT`` is a
    storage proxy (:mod:`safesearch.proxy`). An empty ``url`` is an error, not the default (an empty
    ``$SAFESEARCH_STORAGE`` counts as unset).
    """
    if url is not None and not url.strip():
        raise UserError("storage URL is empty (--storage: give sqlite:///PATH, a file path or postgresql+psycopg://...)")
    url = (url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE_URL).strip()
    if "://" not in url:
        return f"sqlite:///{url}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return resolve_url(url).startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for in-memory or a server URL)."""
    url = resolve_url(url)
    if not url.startswith("sqlite"):
        return None
    parsed = _parse(url)
    if parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _parse(url: str) -> sa.engine.URL:
    try:
        parsed = sa.engine.make_url(url)
    except Exception as e:  # sqlalchemy raises ArgumentError, ValueError for bad ports, ...
        raise UserError(f"storage {mask_url(url)}: not a database URL ({e})") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        return parsed
    if backend != "postgresql":
        raise UserError(
            f"storage {mask_url(url)}: unsupported database {backend!r} "
            "(use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB)"
        )
    if driver and driver not in _POSTGRES_DRIVERS:
        raise UserError(f"storage {mask_url(url)}: unsupported PostgreSQL driver {driver!r} (use psycopg or psycopg2)")
    if driver == "psycopg2":
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise UserError(
                f"storage {mask_url(url)}: the psycopg2 driver is not installed (use postgresql+psycopg://)"
            ) from None
    return parsed


def _where(parsed: sa.engine.URL) -> str:
    return f"host {parsed.host or 'localhost'}:{parsed.port or 5432}, database {parsed.database!r}"


def _engine_kwargs(parsed: sa.engine.URL) -> dict[str, Any]:
    if parsed.drivername.startswith("sqlite"):
        # The heartbeat thread writes while the trial loop reads: wait for the file lock, don't fail.
        return {"connect_args": {"timeout": 30}}
    # synchronous_commit=off for this worker's sessions: a commit returns before the server's WAL flush
    # (a trial is a few dozen small commits). A server crash may lose the last ~0.6 s of commits, never
    # consistency; a trial whose tell was lost stays RUNNING and the heartbeat fails and retries it.
    # The URL's own ``options`` (e.g. a search_path) come after, so they are kept and win.
    options = " ".join(["-c synchronous_commit=off", *_query_values(parsed, "options")])
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "options": options, **KEEPALIVES}
    if "application_name" not in parsed.query:
        # Who holds a connection, in pg_stat_activity (an operator's first question during an incident).
        connect_args["application_name"] = f"safesearch {socket.gethostname()}:{os.getpid()}"[:63]
    return {**POOL_KWARGS, "connect_args": connect_args}


def _query_values(parsed: sa.engine.URL, key: str) -> list[str]:
    value = parsed.query.get(key)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _fast_sqlite_commits(engine: sa.Engine) -> None:
    """WAL journal, no fsync per commit: a trial writes a few dozen small rows (one commit each).

    A crash of the machine may lose the last commits, never the database: a trial whose tell was lost
    stays RUNNING and the heartbeat fails and retries it. Connections opened before this get it too
    (the pool is emptied).
    """
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()


def _schema_ready(conn: sa.Connection) -> bool:
    """Optuna stamps ``alembic_version`` last, so a stamped schema is a complete one."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return False
    return conn.execute(sa.text("select count(*) from alembic_version")).scalar_one() > 0


@contextmanager
def _schema_lock(url: str, parsed: sa.engine.URL, create: bool = True) -> Iterator[None]:
    """Serialise the first initialisation of the tables across processes (PostgreSQL only).

    Also the place where a server that cannot be reached is reported, before Optuna's own errors, and
    where a database without Optuna's tables is refused when ``create`` is false.
    """
    if parsed.drivername.startswith("sqlite"):
        yield
        return
    with _server(url, parsed) as conn:
        if _schema_ready(conn):
            conn.rollback()
            yield
            return
        if not create:
            raise UserError(f"storage {mask_url(url)}: {_where(parsed)} holds no studies (no Optuna tables)")
        conn.execute(sa.text("select pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("select pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            conn.commit()


@contextmanager
def _server(url: str, parsed: sa.engine.URL) -> Iterator[sa.Connection]:
    """One connection to the database server, or a one-line error naming host and database."""
    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        try:
            conn = engine.connect()
        except sa.exc.DBAPIError as e:
            raise UserError(f"storage {mask_url(url)}: cannot connect to {_where(parsed)} ({driver_message(e)})") from None
        with conn:
            yield conn
    finally:
        engine.dispose()


def probe_storage(url: str | None = None) -> bool:
    """Check, creating nothing, that studies can be kept at ``url``: a supported URL, a SQLite file that is
    a database (or can be made: its folder exists or can be made, and is writable), a server that
    answers. True when it already holds Optuna's tables. Commands that load a model first call this, so
    that a wrong storage is reported before a long load, and a failed load leaves no database behind."""
    url = resolve_url(url)
    if is_proxy_url(url):
        from safesearch.proxy import probe_proxy

        return probe_proxy(url)
    parsed = _parse(url)
    path = _sqlite_file(url)
    if path is not None:
        if path.exists():
            return _sqlite_has_tables(url, path)
        from safesearch.outputs import check_output_file

        check_output_file(path, f"storage {url}:")
        return False
    with _server(url, parsed) as conn:
        return _schema_ready(conn)


def open_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRIES,
    create: bool = True,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
    connections: int | None = None,
) -> RDBStorage:
    """Open the Optuna storage at ``url`` (see :func:`resolve_url`), creating the database file and the
    tables if needed, or, with ``create=False`` (the commands that only read studies), refusing a
    storage that holds none: a missing SQLite file, a file that is not a SQLite database, a database
    without Optuna's tables. Nothing is created then, not even a directory.

    ``heartbeat_interval`` (seconds; None turns the heartbeat off) and ``grace_period`` (seconds
    without a heartbeat before a running trial is failed; default twice the interval) detect dead
    workers; each stale trial is retried up to ``max_retry`` times (None: without limit) by
    :class:`RetryTrial`. The heartbeat also serves SQLite: a worker that resumes a study after a killed
    one retries the killed one's trial.

    A server storage is a :class:`~safesearch.reconnect.ReconnectingStorage`: a call that loses its
    connection is made again, with back-off, for up to ``max_outage_s`` seconds of outage (then
    :class:`~safesearch.reconnect.StorageOutage`, one line); a SQLite file cannot lose its connection.
    ``connections``: a server pool of exactly that many kept connections (a storage proxy, one per server
    thread) instead of a worker's 2 + 2 overflow, whose overflow connections are closed when given back.

    Raises :class:`UserError` (one line, password masked) for a URL that is not a supported
    database or a server that cannot be reached (host and database named).
    """
    url = resolve_url(url)
    if is_proxy_url(url):
        return _open_proxy(url, heartbeat_interval, grace_period, max_retry, max_outage_s)
    parsed = _parse(url)
    if heartbeat_interval is not None and heartbeat_interval <= 0:
        raise UserError(f"heartbeat interval {heartbeat_interval}: must be a positive number of seconds")
    if grace_period is not None and grace_period <= 0:
        raise UserError(f"heartbeat grace period {grace_period}: must be a positive number of seconds")
    path = _sqlite_file(url)
    if path is not None:
        if create:
            _make_parent(url, path)
        else:
            _check_sqlite_study_file(url, path)
    with _schema_lock(url, parsed, create), warnings.catch_warnings():
        # The heartbeat API is marked experimental since optuna 2.8; it is what Optuna offers.
        warnings.simplefilter("ignore", ExperimentalWarning)
        heartbeat_kwargs: dict[str, Any] = {}
        if heartbeat_interval is not None:
            heartbeat_kwargs = {
                "heartbeat_interval": int(heartbeat_interval),
                "grace_period": int(grace_period) if grace_period is not None else None,
                "heartbeat_stale_trial_callback": RetryTrial(max_retry),
            }
        try:
            if is_sqlite(url):
                storage = RDBStorage(url, engine_kwargs=_engine_kwargs(parsed), **heartbeat_kwargs)
                _fast_sqlite_commits(storage.engine)
                return storage
            if max_outage_s < 0:
                raise UserError(f"maximum outage {max_outage_s:g}: must be 0 or more seconds")
            engine_kwargs = _engine_kwargs(parsed)
            if connections is not None:
                engine_kwargs.update(pool_size=connections, max_overflow=0)
            return ReconnectingStorage(url, engine_kwargs=engine_kwargs, backoff=Backoff(max_outage_s),
                                       **heartbeat_kwargs)
        except (sa.exc.DBAPIError, optuna.exceptions.StorageInternalError) as e:
            # Optuna wraps some failures of its start-up queries (too many connections) in its own error.
            where = str(path) if path is not None else _where(parsed)
            raise UserError(f"storage {mask_url(url)}: cannot open {where} ({driver_message(e)})") from None


def _open_proxy(url: str, heartbeat_interval: int | None, grace_period: int | None,
                max_retry: int | None, max_outage_s: float) -> Any:
    """The storage behind a ``grpc://`` proxy: the proxy's heartbeat interval and grace period hold for
    every worker (see :mod:`safesearch.proxy`), so a worker may only turn its heartbeat on or off."""
    from safesearch.proxy import open_proxy

    if grace_period is not None:
        raise UserError(f"storage {mask_url(url)}: the storage proxy sets the heartbeat grace period "
                        "(safesearch storage proxy --heartbeat-grace), not its workers")
    return open_proxy(url, heartbeat=heartbeat_interval is not None, max_retry=max_retry, max_outage_s=max_outage_s)


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for a server); an in-memory database is refused."""
    path = sqlite_path(url)
    if is_sqlite(url) and path is None:
        raise UserError(f"storage {url}: an in-memory database keeps nothing once the command ends; "
                        "give a file (sqlite:///PATH)")
    return path


def _make_parent(url: str, path: Path) -> None:
    if path.is_dir():
        raise UserError(f"storage {url}: {path} is a directory, not a database file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"storage {url}: a parent of {path} is a file, not a directory") from None
    except OSError as e:
        raise UserError(f"storage {url}: cannot create directory {path.parent} ({e.strerror})") from None


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite_study_file(url: str, path: Path) -> None:
    """A SQLite file that holds Optuna's tables, read without writing anything."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"storage {url}: {path} {what} (no studies there; create one with safesearch run SPEC)")
    if not _sqlite_has_tables(url, path):
        raise UserError(f"storage {url}: {path} holds no studies (no Optuna tables)")


def _sqlite_has_tables(url: str, path: Path) -> bool:
    """Whether the existing file ``path`` is a SQLite database with Optuna's tables (an empty file: no);
    a file that is something else is an error. Opened read-only."""
    if path.is_dir():
        raise UserError(f"storage {url}: {path} is a directory, not a database file")
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise UserError(f"storage {url}: cannot read {path} ({e.strerror})") from None
    if not head:
        return False
    if head != _SQLITE_MAGIC:
        raise UserError(f"storage {url}: {path} is not a SQLite database")
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return con.execute("select count(*) from sqlite_master where name = 'alembic_version'").fetchone()[0] > 0
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(f"storage {url}: cannot read {path} ({e})") from None


class RetryTrial:
    """Queue a fresh copy of a failed trial (its worker died, or the trial raised), at most ``max_retries``
    times per original trial (None: without limit).

    The copy is WAITING, so the next ``study.ask()`` of any worker runs it; it has the same parameters
    and starts clean: of the user attrs only ``baseline`` is kept (a retried baseline is still that
    baseline), plus ``retry_of`` (the trial it retries); the system attrs are Optuna's
    ``failed_trial`` (the first attempt) and ``retry_history`` (every attempt so far), which
    :func:`unretried_failures` reads, and an enqueued trial's ``fixed_params``. Returns the retry's
    number, or None when the retries are spent.
    """

    def __init__(self, max_retries: int | None = DEFAULT_MAX_RETRIES) -> None:
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int | None:
        history = [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]
        if self.max_retries is not None and len(history) > self.max_retries:
            return None
        user_attrs: dict[str, Any] = {"retry_of": trial.number}
        if BASELINE_ATTR in trial.user_attrs:
            user_attrs[BASELINE_ATTR] = trial.user_attrs[BASELINE_ATTR]
        system_attrs: dict[str, Any] = {"failed_trial": history[0], RETRY_HISTORY: history}
        if FIXED_PARAMS in trial.system_attrs:
            # An enqueued trial (a baseline) that failed before its first suggest has no params yet: its
            # values are only there. Without them its retry would be sampled, under the baseline's name.
            system_attrs[FIXED_PARAMS] = trial.system_attrs[FIXED_PARAMS]
        retry = optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
        retry._validate()  # what study.add_trial checks; the storage call below also gives the number
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=retry)
        return study._storage.get_trial_number_from_id(trial_id)


def give_up(study: optuna.Study, trial: optuna.Trial, error: str, retry: RetryTrial, *,
            interrupted: bool = False) -> int | None:
    """Tell ``trial`` FAIL with ``error`` (user attr ``error``) and queue its retry; the retry's number.

    None when the retries are spent, when another worker failed the trial first (as heartbeat-stale:
    it queued the retry) or when the storage itself cannot be reached (the trial stays RUNNING and the
    heartbeat fails and retries it later). Interrupts wait until both writes are done; a storage outage
    is waited for (see :mod:`safesearch.reconnect`), except on an ``interrupted`` trial, which must not
    hold the exit back: its writes are tried once.
    """
    with interrupts.deferred(), impatient() if interrupted else nullcontext():
        try:
            trial.set_user_attr("error", error[:500])
            study.tell(trial, state=TrialState.FAIL)
            return retry(study, study._storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            return None
        except (sa.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, StorageOutage, StorageFailure):
            return None


def unretried_failures(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Failed trials that no later trial retries (their retries were spent, or their worker died
    between failing them and queueing the retry); surplus trials (see :func:`next_trial`) excluded."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried
            and not t.system_attrs.get(SURPLUS_ATTR)]


def open_study(
    storage: optuna.storages.BaseStorage | str | None,
    study_name: str,
    directions: Sequence[str | StudyDirection],
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    create: bool = True,
) -> optuna.Study:
    """Create the study ``study_name`` or join it if it exists; safe when many workers start at once.

    ``directions``: ``"maximize"``/``"minimize"`` per objective. A study of that name with other
    directions is refused with a one-line :class:`UserError`, as is a missing study when
    ``create=False``. ``storage`` may be an opened storage or a URL (opened with the defaults).
    """
    if storage is None or isinstance(storage, str):
        storage = open_storage(storage)
    wanted = [d if isinstance(d, StudyDirection) else StudyDirection[str(d).upper()] for d in directions]
    if create:
        # load_if_exists turns a concurrent creation (DuplicatedStudyError) into a load.
        study = optuna.create_study(storage=storage, study_name=study_name, directions=wanted,
                                    sampler=sampler, load_if_exists=True)
    else:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        except KeyError:
            raise UserError(f"study {study_name!r}: not found in storage {mask_url(storage.url)}") from None
    check_directions(study, wanted)
    return study


def check_directions(study: optuna.Study, directions: Sequence[str | StudyDirection]) -> None:
    """Refuse a study whose directions are not ``directions`` (one line naming study and storage)."""
    wanted = [d if isinstance(d, StudyDirection) else StudyDirection[str(d).upper()] for d in directions]
    if list(study.directions) != wanted:
        url = getattr(rdb_of(study) or study._storage, "url", None)  # a proxy's storage has its URL too
        where = f" in storage {mask_url(url)}" if url else ""
        raise UserError(
            f"study {study.study_name!r}{where} exists with directions {direction_names(study.directions)}, "
            f"not {direction_names(wanted)}; choose another study name"
        )


def load_study(storage: optuna.storages.BaseStorage | str | None, study_name: str,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """An existing study, or a one-line :class:`UserError` naming the study and the storage (a URL is
    opened for reading: nothing is created)."""
    if storage is None or isinstance(storage, str):
        storage = open_storage(storage, heartbeat_interval=None, create=False)
    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        known = f" (studies there: {', '.join(names)})" if names else " (it holds no study)"
        raise UserError(f"study {study_name!r}: not found in storage {mask_url(storage.url)}{known}") from None


def direction_names(directions: Sequence[StudyDirection]) -> str:
    return "[" + ", ".join(d.name.lower() for d in directions) + "]"


def artifact_root(url: str | None = None, path: str | os.PathLike[str] | None = None) -> Path:
    """Where the artifact store of the storage at ``url`` lives: ``path`` if given, else
    ``$SAFESEARCH_ARTIFACTS``, else ``<db dir>/artifacts`` next to a SQLite file, else ``storage/artifacts``
    (cwd-relative). With workers on several machines, give every worker (and the dashboard) one shared path."""
    chosen = path or os.environ.get(ARTIFACTS_ENV)
    if chosen:
        return Path(chosen)
    db = sqlite_path(url) if is_sqlite(resolve_url(url)) else None
    return db.parent / "artifacts" if db is not None else Path("storage") / "artifacts"


def artifact_store_for(url: str | None = None, path: str | os.PathLike[str] | None = None, *,
                       create: bool = True) -> FileSystemArtifactStore:
    """The artifact store at :func:`artifact_root`, its directory made if missing; ``create=False``
    (readers: the dashboard) makes none, and a missing one reads as empty."""
    root = artifact_root(url, path)
    if root.exists() and not root.is_dir():
        raise UserError(f"artifact store {root}: is a file, not a directory")
    if not create and not root.exists():
        from safesearch.outputs import existing_ancestor

        existing_ancestor(root, "artifact store")  # a file on the way is an error; nothing is made
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"artifact store {root}: a parent of it is a file, not a directory") from None
        except OSError as e:
            raise UserError(f"artifact store {root}: cannot create it ({e.strerror})") from None
    return FileSystemArtifactStore(str(root))


# --- The trial loop of a worker among many ------------------------------------------------------


def fail_stale(study: optuna.Study) -> None:
    """Mark trials whose worker stopped beating as FAIL and queue their retries (heartbeat storages).

    Optuna only judges trials that beat at least once; a worker killed between asking for a trial
    and its first beat (milliseconds) would leave it RUNNING for ever, and the study one trial short.
    So a trial seen RUNNING without any beat for longer than the grace period, by this process's own
    clock (machines' clocks and time zones may differ), is failed and retried the same way. Hence
    every worker of a study must run with a heartbeat (the default). Nothing is judged stale for a grace
    period after this process's storage comes back from an outage (``OutageWatch.settling``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        _fail_silent(study)


def grace_period_of(study: optuna.Study) -> float | None:
    """Seconds without a beat before a running trial is failed as stale (None without heartbeat)."""
    # Past Optuna's cache layer, which has the interval but not the grace period.
    return grace_period_s(getattr(study._storage, "_backend", study._storage))


# (id of the RDBStorage, trial id) -> when this process first saw the trial RUNNING without a beat.
_silent_since: dict[tuple[int, int], float] = {}


def rdb_of(study: optuna.Study) -> RDBStorage | None:
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # optuna wraps RDBStorage in a _CachedStorage
    return storage if isinstance(storage, RDBStorage) else None


def never_beaten(rdb: RDBStorage, study_id: int) -> set[int]:
    """The study's RUNNING trials without any heartbeat row (their worker died before its first beat, or
    the beat has not landed yet); the query rides out an outage on a reconnecting storage."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    def query() -> set[int]:
        with _create_scoped_session(rdb.scoped_session) as session:
            return {
                trial_id
                for (trial_id,) in session.query(models.TrialModel.trial_id)
                .outerjoin(models.TrialHeartbeatModel,
                           models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study_id)
                .filter(models.TrialModel.state == TrialState.RUNNING)
                .filter(models.TrialHeartbeatModel.trial_heartbeat_id.is_(None))
            }

    return rdb.call_reconnecting(query) if isinstance(rdb, ReconnectingStorage) else query()


def _fail_silent(study: optuna.Study) -> None:
    rdb = rdb_of(study)
    if rdb is None or rdb.heartbeat_interval is None:
        return
    grace = grace_period_s(rdb)
    silent = never_beaten(rdb, study._study_id)
    if isinstance(rdb, ReconnectingStorage) and rdb.outages.settling(grace):
        return
    now, key = time.monotonic(), id(rdb)
    for k in [k for k in _silent_since if k[0] == key and k[1] not in silent]:
        del _silent_since[k]
    callback = rdb.get_heartbeat_stale_trial_callback()
    for trial_id in silent:
        if now - _silent_since.setdefault((key, trial_id), now) <= grace:
            continue
        del _silent_since[(key, trial_id)]
        try:
            failed = study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
            continue
        if failed and callback is not None:
            callback(study, copy.deepcopy(study._storage.get_trial(trial_id)))


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat for ``trial`` while the block runs (what ``study.optimize`` does; needed in ask/tell loops).

    Run the whole trial, from the first suggest to ``study.tell``, inside it.
    """
    interval = heartbeat_interval_of(study)
    if interval is None:
        yield
        return
    # Not Optuna's heartbeat thread: it dies (with a traceback) at the first beat the storage fails,
    # and the trial of a worker that lived through an outage is then failed as a dead worker's.
    # Not a `with` either: an interrupt right after the thread starts would skip the join.
    beating = Heartbeat(trial._trial_id, study._storage, interval, grace_s=grace_period_of(study))
    started = False
    try:
        with interrupts.deferred():
            beating.start()
            started = True
        yield
    finally:
        if started:
            with interrupts.deferred():
                beating.join()


def heartbeat_interval_of(study: optuna.Study) -> int | None:
    getter = getattr(study._storage, "get_heartbeat_interval", None)
    return getter() if getter is not None else None


def count_states(study: optuna.Study) -> dict[TrialState, int]:
    """How many trials of the study are in each state (every state present, zeros included).

    On a database storage one ``GROUP BY`` query (rides out an outage on a reconnecting storage): reading
    the trials, as elsewhere, costs five queries and their rows, and a worker counts before every trial."""
    counts = dict.fromkeys(TrialState, 0)
    rdb = rdb_of(study)
    if rdb is None:
        for t in study.get_trials(deepcopy=False):
            counts[t.state] += 1
        return counts
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    def query() -> list[tuple[TrialState, int]]:
        with _create_scoped_session(rdb.scoped_session) as session:
            return list(
                session.query(models.TrialModel.state, sa.func.count(models.TrialModel.trial_id))
                .filter(models.TrialModel.study_id == study._study_id)
                .group_by(models.TrialModel.state)
            )

    rows = rdb.call_reconnecting(query) if isinstance(rdb, ReconnectingStorage) else query()
    for state, n in rows:
        counts[state] += n
    return counts


def _ask(study: optuna.Study, waiting: int) -> optuna.Trial:
    """``study.ask()``, less its read of the study's WAITING trials when ``waiting`` (just counted) is 0:
    then that read finds none, and ask creates a trial, as here. A trial enqueued since the count waits
    for the next ask, as it would for one a moment later."""
    if waiting:
        return study.ask()
    study._thread_local.cached_all_trials = None  # as study.ask: a new trial outdates the cached list
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


_CLAIMED = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
# (id of the storage, study id) -> when this process last ran fail_stale on that study
_stale_checked: dict[tuple[int, int], float] = {}


def next_trial(
    study: optuna.Study,
    n_trials: int,
    *,
    poll_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    retry: RetryTrial | None = None,
) -> optuna.Trial | None:
    """Ask for the next trial of a study whose budget is ``n_trials`` COMPLETE trials; None when done.

    Safe for any number of workers: Optuna numbers trials under a row lock, and a trial runs only if
    fewer than ``n_trials`` trials numbered before it are COMPLETE, RUNNING or WAITING; otherwise it
    is told FAIL at once with system attr ``safesearch:surplus`` and the worker looks again. So the
    study never holds more than ``n_trials`` COMPLETE trials, and none is lost: while the budget is
    held by other workers' running trials, this waits (polling every ``poll_s``, default the heartbeat
    interval capped at 2 s), failing stale ones (:func:`fail_stale`), so that the retry of a trial
    whose worker died is picked up here. Without a heartbeat nobody can tell a dead worker from a
    slow one, so it returns None instead of waiting. ``should_stop`` (polled) ends the wait early.

    Waiting trials (enqueued baselines, retries) come first, as with ``study.ask()``. Run the trial
    inside :func:`heartbeat`. An interrupt between asking for a trial and returning it fails the trial
    and queues it again (``retry``, default :class:`RetryTrial`), so that no trial is left RUNNING.
    """
    interval = heartbeat_interval_of(study)
    poll = poll_s if poll_s is not None else min(float(interval or 2), 2.0)
    waited = False
    while True:
        # A trial goes stale only after the grace period (>= one interval): checking once an interval
        # while trials flow is enough; while waiting on other workers' trials, check every poll.
        key = (id(study._storage), study._study_id)
        if waited or interval is None or time.monotonic() - _stale_checked.get(key, -math.inf) >= interval:
            fail_stale(study)
            _stale_checked[key] = time.monotonic()
        counts = count_states(study)
        seen = sum(counts.values())
        if counts[TrialState.COMPLETE] >= n_trials:
            return None
        claimed = sum(counts[s] for s in _CLAIMED)
        if claimed >= n_trials and counts[TrialState.WAITING] == 0:
            if interval is None or (should_stop is not None and should_stop()):
                return None
            time.sleep(poll)
            waited = True
            continue
        trial = None
        try:
            # An interrupt waits for ask() to finish: a trial it creates is then known, and failed below.
            with warnings.catch_warnings(), interrupts.deferred():
                # Optuna warns that heartbeats are meant for study.optimize; heartbeat() covers ask/tell.
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = _ask(study, counts[TrialState.WAITING])
            if interval is not None and rdb_of(study) is None:
                # Beat at once: Optuna only ever fails a trial that has beaten. On a database storage
                # this process's fail_stale also fails a trial that never beat (never_beaten), and the
                # trial's heartbeat thread beats as it starts, so the beat is left to it: a round trip
                # less per trial. Through a storage proxy only beaten trials can be found stale.
                study._storage.record_heartbeat(trial._trial_id)
            # Trials numbered before this one that hold the budget: at most those counted above plus
            # every trial other workers created since (numbers are dealt out in order, so there are
            # trial.number - seen of them); no other trial can join the claimed states (a finished trial
            # never runs again, and a retry is a new trial). Only when that bound leaves no room is the
            # study read again for the true number: a read less per trial while the budget is far.
            if claimed + max(0, trial.number - seen) < n_trials:
                return trial
            ahead = sum(1 for t in study.get_trials(deepcopy=False, states=_CLAIMED) if t.number < trial.number)
            if ahead < n_trials:
                return trial
            study._storage.set_trial_system_attr(trial._trial_id, SURPLUS_ATTR, True)
            study.tell(trial, state=TrialState.FAIL)
        except KeyboardInterrupt:
            if trial is not None:
                give_up(study, trial, "interrupted before it ran", retry or RetryTrial(), interrupted=True)
            raise
