"""How many threads torch runs in a worker, chosen from the machine and the workers that share it.

torch sizes its thread pool to the whole machine, whatever else runs there: four workers on two cores
each ran two threads and were 7-14x slower than with one thread each. So ``worker`` and ``run`` set
their own count, first found of:

1. ``--threads N``: said on the command line, so meant for this process;
2. ``$OMP_NUM_THREADS``: the OpenMP convention, which a scheduler or a user may already have set for
   every process of a job (its first number, if it is a list of nesting levels);
3. the usable CPUs divided by ``--workers-per-machine`` (default 1), at least 1.

The usable CPUs are this process's CPU affinity, which taskset, cgroup cpusets and Slurm's CPU binding
narrow, else ``os.cpu_count()``. A CPU *quota* (a Kubernetes cpu limit, ``docker --cpus``) does not show
in the affinity: under one, give ``--threads``.

Choosing is pure and cheap (no torch), so a bad ``$OMP_NUM_THREADS`` is refused before anything loads;
:func:`apply_threads` sets torch's pools where the command loads its model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from safesearch.errors import UserError

FLAG = "--threads"
ENV = "OMP_NUM_THREADS"
COMPUTED = "computed"


@dataclass(frozen=True)
class ThreadChoice:
    """The threads of one worker, where the number came from, and the machine it was chosen for."""

    threads: int
    source: str  # FLAG, ENV or COMPUTED
    cpus: int
    workers: int

    @property
    def oversubscribed(self) -> bool:
        """More threads on the machine, all workers counted, than usable CPUs: each worker slows down."""
        return self.threads * self.workers > self.cpus

    def describe(self) -> str:
        """One line for the worker's log, saying what was chosen and why."""
        why = {
            FLAG: FLAG,
            ENV: f"from {ENV}",
            COMPUTED: f"{_n(self.cpus, 'CPU')} / {_n(self.workers, 'worker')}",
        }[self.source]
        if self.oversubscribed:
            why += (
                f"; {_n(self.workers, 'worker')} x {_n(self.threads, 'thread')} oversubscribe "
                f"{_n(self.cpus, 'usable CPU')}"
            )
        return f"torch threads: {self.threads} ({why})"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS tells it, else every CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def omp_threads(env: Mapping[str, str]) -> int | None:
    """``$OMP_NUM_THREADS`` as a count (the outermost level of a list such as ``4,2``), None if unset or
    empty; anything else is a one-line error, where OpenMP would warn and go on with its default."""
    raw = env.get(ENV, "").strip()
    if not raw:
        return None
    first = raw.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise UserError(f"{ENV}={raw!r}: not a positive whole number (unset it, or give {FLAG} N)")
    return int(first)


def choose_threads(
    threads: int | None,
    workers: int = 1,
    *,
    cpus: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """The thread count of one of ``workers`` workers on this machine (see the module docstring for the
    order): ``threads`` is ``--threads`` (None: not given), ``cpus`` and ``env`` default to this process's
    (given in tests)."""
    if workers < 1:
        raise UserError(f"--workers-per-machine {workers}: should be at least 1")
    cpus = usable_cpus() if cpus is None else cpus
    if threads is not None:
        if threads < 1:
            raise UserError(f"{FLAG} {threads}: should be at least 1")
        return ThreadChoice(threads, FLAG, cpus, workers)
    from_env = omp_threads(os.environ if env is None else env)
    if from_env is not None:
        return ThreadChoice(from_env, ENV, cpus, workers)
    return ThreadChoice(max(1, cpus // workers), COMPUTED, cpus, workers)


def apply_threads(choice: ThreadChoice) -> None:
    """Size torch's pools to ``choice``. The intra-op pool can be resized at any time; the inter-op pool
    only before torch first used it (else torch raises), so a pool already running keeps its size."""
    import torch

    torch.set_num_threads(choice.threads)
    # RuntimeError: parallel work has started, or the pool was sized before in this process (tests run many
    # commands in one); it keeps its size.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(choice.threads)
