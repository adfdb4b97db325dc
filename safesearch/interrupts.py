"""Ctrl-C and SIGTERM: one way to end a command, and never half-way through a record.

:func:`install` (the command line calls it first thing) makes SIGINT and SIGTERM raise
``KeyboardInterrupt`` and remember that they came: a ``KeyboardInterrupt`` raised inside a garbage
collector or weak-reference callback would be printed and dropped by Python ("Exception ignored in
..."), so it is only remembered there, and a worker asks :func:`raise_if_requested` between trials, the
command line once the command returns. :func:`deferred` holds both signals back while
a record is written (a trial told FAIL and queued again), :func:`blocked` holds them at the C level
while native extensions import (torch aborts the process on a signal during its start-up).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested = threading.Event()


def _on_signal(signum: int, frame: object) -> None:
    _requested.set()
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # A KeyboardInterrupt raised where Python cannot propagate it (a __del__, a weakref callback) would be
    # printed with a traceback and dropped; it is remembered instead, and raised at the next check.
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _requested.set()
        return
    sys.__unraisablehook__(unraisable)


def install() -> dict[object, object]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` from now on (and one Python drops is remembered);
    what was there before is returned, for :func:`restore`. Only the main thread receives signals:
    elsewhere nothing changes."""
    _requested.clear()
    if not _main_thread():
        return {}
    previous: dict[object, object] = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    previous["unraisablehook"] = sys.unraisablehook
    sys.unraisablehook = _unraisable
    return previous


def restore(previous: dict[object, object]) -> None:
    for key, handler in previous.items():
        if key == "unraisablehook":
            sys.unraisablehook = handler  # type: ignore[assignment]
        else:
            signal.signal(key, handler)  # type: ignore[arg-type]


def requested() -> bool:
    return _requested.is_set()


def raise_if_requested() -> None:
    """Raise ``KeyboardInterrupt`` if a signal came that Python dropped on the way."""
    if _requested.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs; one that came meanwhile is raised as
    ``KeyboardInterrupt`` when it ends. Main thread only (elsewhere this does nothing)."""
    if not _main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            _requested.set()
            raise KeyboardInterrupt


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM at the C level while the block runs (native imports); a signal that came
    meanwhile is delivered, and raised, when it ends."""
    if not _main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def import_native() -> None:
    """Load torch (whose native start-up aborts the process on a signal) with SIGINT and SIGTERM blocked.

    The command line starts without torch, so that ``--help`` and bad input answer at once; a command
    calls this where it first needs torch, after its quick checks of the input."""
    if "torch" not in sys.modules:
        with blocked():
            import torch  # noqa: F401


def ignore() -> None:
    """Ignore SIGINT and SIGTERM for good: the command is over, the interpreter shuts down."""
    if _main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
