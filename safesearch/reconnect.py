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
second and no other worker takes the trial for a dead worker's.
"""

from __future__ import annotations

import contextlib
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
    "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids",
)


class ReconnectingStorage(RDBStorage):
    """Optuna's RDBStorage riding out connection losses (see the module docstring).

    ``backoff``: how long and how often to try again; ``report``: where the lines about the connection
    go (stderr by default). Any other argument is RDBStorage's.
    """

    def __init__(self, url: str, *args: Any, backoff: Backoff | None = None,
                 report: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        self.backoff = backoff or Backoff()
        self._report = report or _stderr_line
        self._setup_outage_state()
        super().__init__(url, *args, **kwargs)

    def _setup_outage_state(self) -> None:
        self._outage_lock = threading.Lock()
        self._down_since: float | None = None
        self._depth = threading.local()  # calls of this storage nested in one another (Optuna's own)
        self._rng = random.Random()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        for key in ("_outage_lock", "_down_since", "_depth", "_rng"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._setup_outage_state()
        super().__setstate__(state)

    # -- the outage, as every thread of this process sees it ---------------------------------------------

    def _lost(self, e: BaseException) -> float:
        """Note a failed call; when the outage began (the first failure since the last success)."""
        with self._outage_lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._report(f"storage {mask_url(self.url)}: connection lost ({driver_message(e)}); reconnecting, "
                             f"for at most {self.backoff.max_outage_s:g} s")
            return self._down_since

    def _back(self) -> None:
        if self._down_since is None:  # the usual case: no lock taken
            return
        with self._outage_lock:
            if self._down_since is not None:
                self._report(f"storage {mask_url(self.url)}: reconnected after "
                             f"{time.monotonic() - self._down_since:.1f} s")
                self._down_since = None

    def call_reconnecting(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, made again after each outage until it succeeds or the outage has
        lasted ``max_outage_s``. Only the outermost call of a thread waits: Optuna's methods call one
        another, and the inner ones must fail through to it."""
        depth = getattr(self._depth, "n", 0)
        if depth:
            return fn(*args, **kwargs)
        self._depth.n = 1
        try:
            attempt = 0
            while True:
                try:
                    result = fn(*args, **kwargs)
                except Exception as e:
                    if not is_outage(e):
                        raise
                    since = self._lost(e)
                    # A fresh session for the next attempt: this thread's may wait on a rollback.
                    with contextlib.suppress(Exception):
                        self.scoped_session.remove()
                    if getattr(_local, "impatient", False):
                        raise
                    out_s = time.monotonic() - since
                    if out_s >= self.backoff.max_outage_s:
                        raise StorageOutage(
                            f"storage {mask_url(self.url)}: unreachable for {out_s:.0f} s ({driver_message(e)}); this "
                            "worker gives up (its running trial, if any, is retried by the study's other workers "
                            "once its heartbeat goes silent)") from None
                    time.sleep(min(self.backoff.wait_s(attempt, self._rng),
                                   max(0.0, self.backoff.max_outage_s - out_s)))
                    attempt += 1
                    continue
                self._back()
                return result
        finally:
            self._depth.n = 0

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

    def beat_once(self, trial_id: int) -> None:
        """One heartbeat, not waited for: the heartbeat thread tries again on its own schedule."""
        try:
            RDBStorage.record_heartbeat(self, trial_id)
        except Exception as e:
            if is_outage(e):
                self._lost(e)
            raise
        self._back()


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

    def __init__(self, trial_id: int, storage: Any, interval: float, outage_interval: float = 1.0) -> None:
        self.trial_id = trial_id
        # Past Optuna's cache layer (a study's storage), to the storage that knows beat_once.
        self.storage = getattr(storage, "_backend", storage)
        self.interval = interval
        self.outage_interval = min(outage_interval, interval)
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> bool:
        beat = getattr(self.storage, "beat_once", None) or self.storage.record_heartbeat
        try:
            beat(self.trial_id)
        except Exception as e:  # noqa: BLE001 - a thread has nobody to raise to; tried again soon
            if not is_outage(e) and not self._reported:  # an outage is reported by the storage
                self._reported = True
                _stderr_line(f"heartbeat of trial id {self.trial_id}: {driver_message(e)}; trying again")
            return False
        return True

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
