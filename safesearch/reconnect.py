"""A worker that outlives its database connection: storage calls tried again across an outage.

A PostgreSQL connection can be cut under a running worker: the server restarts or fails over, an idle
timeout or ``pg_terminate_backend`` ends the session, the network drops. Optuna's RDBStorage then
raises ``StorageInternalError`` ("... typically happens due to invalid data in the commit ...", whatever
the cause) from the first call that meets the dead connection, in the trial loop or in the heartbeat
thread, and the worker died with a traceback.

:class:`ReconnectingStorage` is Optuna's RDBStorage in which a call that failed for want of a
connection (:func:`is_outage`) is made again on a fresh one, after a bounded exponential back-off with
jitter (so that a hundred workers do not all reconnect in the same instant). One line is printed when the
connection is lost and one when it is back. After ``max_outage_s`` seconds without the server the call
raises :class:`StorageOutage` (one line) and the worker stops: the trial it held stays RUNNING, its
heartbeat goes silent, and any worker of the study fails it and queues its retry (``storage.fail_stale``).

Why making a call again is safe: each storage call is one transaction, rolled back when it fails, so it
either took effect or did not. The one doubt is a commit that reached the server whose answer was lost:
- a param or an attribute set again is the same value written twice;
- a state change that finds its trial already in that state was done (:meth:`set_trial_state_values`);
- a trial created twice leaves one RUNNING trial that nobody beats for: ``storage.fail_stale`` fails
  and retries it like a dead worker's, and the study's budget counts COMPLETE trials only.

:class:`Heartbeat` beats for a running trial without the trial loop's back-off: every interval, and every
second or so while the server is away, so that once it is back the trial's beat is fresh within a
second. Beats sent during the outage were lost all the same, so a storage that has just come back judges
no trial stale for a grace period (:meth:`OutageWatch.settling`): no live worker's trial is taken for a
dead worker's.

:class:`OutageWatch` holds what is common to any storage that can go away (when, the lines, the waiting
loop); ``safesearch.proxy.ProxyStorage`` uses it for a storage proxy out of reach.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from safesearch.errors import UserError
from safesearch.redact import mask_url

DEFAULT_MAX_OUTAGE_S = 600.0


@dataclass(frozen=True)
class Backoff:
    """How long to wait between attempts: ``first_s`` doubling up to ``cap_s``, each wait drawn from
    its upper half (jitter), for at most ``max_outage_s`` since the outage was first seen."""

    max_outage_s: float = DEFAULT_MAX_OUTAGE_S
    first_s: float = 0.5
    cap_s: float = 30.0

    def wait_s(self, attempt: int, rng: random.Random) -> float:
        base = min(self.cap_s, self.first_s * 2.0**attempt)
        return base * rng.uniform(0.5, 1.0)


class StorageOutage(UserError):
    """The storage stayed out of reach for longer than the worker was told to wait."""


class StorageFailure(UserError):
    """The storage answered but failed the call (an error inside a storage proxy): not worth waiting for."""


def is_outage(e: BaseException) -> bool:
    """Whether ``e`` says the server or the connection to it is gone (worth waiting for), as opposed to
    a request the server refused (a bug or bad data: making it again would fail again).

    Optuna wraps every SQLAlchemy error of a session in ``StorageInternalError``; its cause says which.
    PostgreSQL's "terminating connection", "server closed the connection", "connection refused", "the
    database system is starting up" and deadlocks are all DBAPI ``OperationalError``s.
    """
    if isinstance(e, StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
        return True
    # PendingRollbackError: Optuna's trial read catches the cut connection's OperationalError and tries
    # again on the same session, which then refuses to run before a rollback (seen under load).
    return isinstance(e, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError,
                          sa.exc.DisconnectionError, sa.exc.PendingRollbackError))


def driver_message(e: BaseException) -> str:
    """The driver's own message, on one line (psycopg's spans several), from under SQLAlchemy's wrapper and
    Optuna's ``StorageInternalError``, whose own message blames "invalid data" whatever the cause."""
    cause = e.__cause__ if isinstance(e, StorageInternalError) and e.__cause__ is not None else e
    orig = getattr(cause, "orig", None) or cause
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return "; ".join(lines) or type(orig).__name__


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_local = threading.local()
_slow_beat_said = False  # Heartbeat._check_pace: once per process
_WORKER_GIVES_UP = ("this worker gives up (its running trial, if any, is retried by the study's other workers once "
                    "its heartbeat goes silent)")


@contextlib.contextmanager
def impatient() -> Iterator[None]:
    """Storage calls in this thread try once and raise at an outage instead of waiting: for the writes
    made while a signal is held back (a trial given up on Ctrl-C), which must not delay the exit."""
    before = getattr(_local, "impatient", False)
    _local.impatient = True
    try:
        yield
    finally:
        _local.impatient = before


# The calls that touch the database; each is one transaction (see the module docstring). The leading
# underscore ones are what Optuna's own cache layer calls on its backend.
_RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "get_trial_user_attrs", "get_trial_system_attrs",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials", "get_best_trial",
    "_get_best_trial_id", "record_heartbeat",
)


class OutageWatch:
    """One process's view of its storage being away: when the outage began, the line that says so and
    the line when it ends, and the loop that makes a call again until the storage answers or
    ``backoff.max_outage_s`` has passed. Shared by every thread of the process (one outage, one pair of
    lines), whatever the storage: a database (:class:`ReconnectingStorage`) or a storage proxy
    (``safesearch.proxy.ProxyStorage``).

    ``where``: how lines name the storage (password masked); ``lost``: what happened ("connection
    lost"); ``gives_up``: what follows once the wait is over (who stops, what becomes of the trial).
    """

    def __init__(self, where: str, backoff: Backoff, report: Callable[[str], None] | None = None, *,
                 lost: str = "connection lost", gives_up: str = _WORKER_GIVES_UP) -> None:
        self.where = where
        self.backoff = backoff
        self.report = report or _stderr_line
        self.lost_what = lost
        self.gives_up = gives_up
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.back_at: float | None = None  # when the last outage ended
        self._depth = threading.local()  # calls of this storage nested in one another (Optuna's own)
        self._rng = random.Random()

    def lost(self, reason: str) -> float:
        """Note a failed call; when the outage began (the first failure since the last success)."""
        with self._lock:
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.report(f"{self.where}: {self.lost_what} ({reason}); reconnecting, for at most "
                            f"{self.backoff.max_outage_s:g} s")
            return self.down_since

    def back(self) -> None:
        if self.down_since is None:  # the usual case: no lock taken
            return
        with self._lock:
            if self.down_since is not None:
                self.back_at = time.monotonic()
                self.report(f"{self.where}: reconnected after {self.back_at - self.down_since:.1f} s")
                self.down_since = None

    def once(self, fn: Callable[[], Any], *, outage: Callable[[BaseException], str | None]) -> Any:
        """``fn()`` tried once, not waited for (a heartbeat: its thread tries again on its own schedule); a
        failure for want of the storage is noted (the line when the outage begins) and raised as it came."""
        try:
            result = fn()
        except Exception as e:
            reason = outage(e)
            if reason is not None:
                self.lost(reason)
            raise
        self.back()
        return result

    def dropped(self) -> None:
        """A connection was found dead and replaced without a failed call (the pool's pre-ping, at the
        first call after an outage that no call of this process met): beats may have been lost all the
        same, so the storage settles from now (:meth:`settling`)."""
        with self._lock:
            if self.down_since is None:
                self.back_at = time.monotonic()

    def settling(self, grace_s: float) -> bool:
        """Whether the storage is away, or came back less than ``grace_s`` seconds ago. Every beat sent during
        an outage was lost, so until each live worker has beaten again (its :class:`Heartbeat` tries every
        second) a live worker's trial looks as stale as a dead one's: stale trials are judged after that."""
        if self.down_since is not None:
            return True
        return self.back_at is not None and time.monotonic() - self.back_at < grace_s

    def call(self, fn: Callable[[], Any], *, outage: Callable[[BaseException], str | None],
             reset: Callable[[], None] | None = None) -> Any:
        """``fn()``, made again after each outage until it succeeds or the outage has lasted
        ``max_outage_s`` (then :class:`StorageOutage`). ``outage(e)``: the one-line reason when ``e``
        means the storage is away, None for any other error (raised at once: making it again would fail
        again). ``reset``: run before the next attempt (a fresh database session). Only the outermost call
        of a thread waits: Optuna's methods call one another, and the inner ones must fail through to it."""
        if getattr(self._depth, "n", 0):
            return fn()
        self._depth.n = 1
        try:
            attempt = 0
            while True:
                try:
                    result = fn()
                except Exception as e:
                    reason = outage(e)
                    if reason is None:
                        raise
                    since = self.lost(reason)
                    if reset is not None:
                        with contextlib.suppress(Exception):
                            reset()
                    if getattr(_local, "impatient", False):
                        raise
                    out_s = time.monotonic() - since
                    if out_s >= self.backoff.max_outage_s:
                        raise StorageOutage(f"{self.where}: unreachable for {out_s:.0f} s ({reason}); "
                                            f"{self.gives_up}") from None
                    time.sleep(min(self.backoff.wait_s(attempt, self._rng),
                                   max(0.0, self.backoff.max_outage_s - out_s)))
                    attempt += 1
                    continue
                self.back()
                return result
        finally:
            self._depth.n = 0


def grace_period_s(storage: Any) -> float | None:
    """Seconds without a beat before a running trial counts as stale, by Optuna's rule: the storage's grace
    period, else twice its heartbeat interval; None for a storage without a heartbeat."""
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return None
    return getattr(storage, "grace_period", None) or 2 * interval


def database_outage(e: BaseException) -> str | None:
    """The driver's one-line reason when ``e`` is a lost connection (:func:`is_outage`), else None."""
    return driver_message(e) if is_outage(e) else None


class _LostConnectionFallback(logging.Filter):
    """Drops Optuna's warning that its trial read "caught an error from sqlalchemy ... falling back to a
    slower alternative" when the error is a lost connection: a dozen lines of SQL and parameters in the
    worker's log at every cut, about an error the storage reports in one line and waits out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Caught an error from sqlalchemy") and any(m in message for m in _LOST))


# How the driver's error reads in Optuna's warning when the connection was lost: its class (psycopg names
# AdminShutdown, a server that terminated the session, by its own class, not OperationalError) or the
# pool's refusal to go on until the dead transaction is rolled back.
_LOST = ("OperationalError", "AdminShutdown", "Can't reconnect until invalid transaction is rolled back")


def _quiet_optuna_fallback() -> None:
    logger = logging.getLogger("optuna.storages._rdb.storage")
    if not any(isinstance(f, _LostConnectionFallback) for f in logger.filters):
        logger.addFilter(_LostConnectionFallback())


class ReconnectingStorage(RDBStorage):
    """Optuna's RDBStorage riding out connection losses (see the module docstring).

    ``backoff``: how long and how often to try again; ``report``: where the lines about the connection
    go (stderr by default); ``gives_up``: what the line at the end of the wait adds (by default, that
    this worker stops and its trial is retried elsewhere). Any other argument is RDBStorage's.
    """

    def __init__(self, url: str, *args: Any, backoff: Backoff | None = None,
                 report: Callable[[str], None] | None = None, gives_up: str = _WORKER_GIVES_UP,
                 **kwargs: Any) -> None:
        # Before RDBStorage's constructor, whose own queries may already need it.
        self.outages = OutageWatch(f"storage {mask_url(url)}", backoff or Backoff(), report, gives_up=gives_up)
        super().__init__(url, *args, **kwargs)
        self._watch_pool()
        _quiet_optuna_fallback()

    def _watch_pool(self) -> None:
        sa.event.listen(self.engine, "invalidate", lambda *_: self.outages.dropped())

    @property
    def backoff(self) -> Backoff:
        return self.outages.backoff

    @backoff.setter
    def backoff(self, backoff: Backoff) -> None:
        self.outages.backoff = backoff

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        watch = state.pop("outages")  # a lock and a thread-local: made anew on the other side
        state["_outage_settings"] = (watch.backoff, watch.report, watch.gives_up)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        backoff, report, gives_up = state.pop("_outage_settings")
        self.outages = OutageWatch(f"storage {mask_url(state['url'])}", backoff, report, gives_up=gives_up)
        super().__setstate__(state)
        self._watch_pool()

    def call_reconnecting(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, made again after each outage (:meth:`OutageWatch.call`), each time on a
        fresh session: this thread's may wait on a rollback."""
        return self.outages.call(lambda: fn(*args, **kwargs), outage=database_outage,
                                 reset=self.scoped_session.remove)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        attempts = 0

        def once() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # An earlier attempt may have committed before its answer was lost: then it is done.
                if attempts > 1 and _has_state(RDBStorage.get_trial(self, trial_id), state, values):
                    return True
                raise

        return self.call_reconnecting(once)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (beaten, then silent past the grace period), none while the storage is
        settling after an outage (:meth:`OutageWatch.settling`): judged after the query, which may be the
        call that finds the outage."""
        stale = self.call_reconnecting(RDBStorage._get_stale_trial_ids, self, study_id)
        grace = grace_period_s(self)
        return [] if grace is not None and self.outages.settling(grace) else stale

    def beat_once(self, trial_id: int) -> None:
        """One heartbeat, not waited for: the heartbeat thread tries again on its own schedule."""
        self.outages.once(lambda: RDBStorage.record_heartbeat(self, trial_id), outage=database_outage)


def _has_state(trial: Any, state: TrialState, values: Sequence[float] | None) -> bool:
    if trial.state != state:
        return False
    return values is None or list(trial.values or []) == [float(v) for v in values]


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def call(self: ReconnectingStorage, *args: Any, **kwargs: Any) -> Any:
        return self.call_reconnecting(method, self, *args, **kwargs)

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


for _name in _RETRIED:
    setattr(ReconnectingStorage, _name, _retrying(_name))


class Heartbeat:
    """The thread that beats for a running trial: every ``interval`` seconds, and every
    ``outage_interval`` seconds while beats fail (the server is away), so that the beat is fresh as soon
    as it is back. A failed beat never ends the thread (Optuna's thread died on the first one, printing
    a traceback). ``start`` / ``join`` as Optuna's heartbeat thread."""

    def __init__(self, trial_id: int, storage: Any, interval: float, outage_interval: float = 1.0, *,
                 grace_s: float | None = None) -> None:
        self.trial_id = trial_id
        self.grace_s = grace_s
        # Past Optuna's cache layer (a study's storage), to the storage that knows beat_once.
        self.storage = getattr(storage, "_backend", storage)
        self.interval = interval
        self.outage_interval = min(outage_interval, interval)
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> bool:
        beat = getattr(self.storage, "beat_once", None) or self.storage.record_heartbeat
        t0 = time.monotonic()
        try:
            beat(self.trial_id)
            self._check_pace(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - a thread has nobody to raise to; tried again soon
            outage = is_outage(e) or isinstance(e, StorageOutage)
            if not outage and not self._reported:  # an outage is reported by the storage
                self._reported = True
                _stderr_line(f"heartbeat of trial id {self.trial_id}: {driver_message(e)}; trying again")
            return False
        return True

    def _check_pace(self, took_s: float) -> None:
        """One line per process when a beat took more than half the grace period: the storage is so slow
        that a live worker's beat can land past the grace, and its trial be failed as a dead worker's
        (seen with a 3 s grace on an overloaded machine, benchmarks/load.py)."""
        global _slow_beat_said
        if self.grace_s is None or took_s <= self.grace_s / 2 or _slow_beat_said:
            return
        _slow_beat_said = True
        _stderr_line(f"heartbeat of trial id {self.trial_id} took {took_s:.1f} s, over half the grace period "
                     f"({self.grace_s:g} s): live trials may be failed as stale; give the study's workers a longer "
                     "grace (--heartbeat-grace, on the storage proxy if there is one)")

    def _run(self) -> None:
        while True:
            wait = self.interval if self._beat() else self.outage_interval
            if self._stop.wait(timeout=wait):
                return

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        self._thread.join()
