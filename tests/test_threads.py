"""Each worker's torch threads: --threads, else $OMP_NUM_THREADS, else the usable CPUs / workers per machine.

The choice is a pure function (tested on its own); one worker runs through the real command line and
leaves torch with the count it was told.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_run import run_cli
from study_world import spec_dict, write_spec

from safesearch.errors import UserError
from safesearch.threads import ThreadChoice, apply_threads, choose_threads, omp_threads, usable_cpus


@pytest.mark.parametrize(
    ("threads", "workers", "env", "expected", "source"),
    [
        (None, 1, {}, 8, "computed"),
        (None, 2, {}, 4, "computed"),
        (None, 3, {}, 2, "computed"),  # rounded down: never more threads than CPUs
        (None, 16, {}, 1, "computed"),  # more workers than CPUs: still one thread each
        (None, 4, {"OMP_NUM_THREADS": "3"}, 3, "OMP_NUM_THREADS"),  # the environment beats the division
        (None, 1, {"OMP_NUM_THREADS": "6,2"}, 6, "OMP_NUM_THREADS"),  # nested levels: the outermost
        (None, 2, {"OMP_NUM_THREADS": " "}, 4, "computed"),  # empty counts as unset
        (5, 4, {"OMP_NUM_THREADS": "3"}, 5, "--threads"),  # the flag beats everything
        (5, 1, {"OMP_NUM_THREADS": "junk"}, 5, "--threads"),  # an environment not used is not judged
    ],
)
def test_the_order_of_choice(
    threads: int | None, workers: int, env: dict[str, str], expected: int, source: str
) -> None:
    choice = choose_threads(threads, workers, cpus=8, env=env)
    assert (choice.threads, choice.source, choice.cpus, choice.workers) == (expected, source, 8, workers)


def test_the_line_says_what_was_chosen_and_why() -> None:
    assert choose_threads(None, 2, cpus=2, env={}).describe() == "torch threads: 1 (2 CPUs / 2 workers)"
    assert choose_threads(None, 1, cpus=1, env={}).describe() == "torch threads: 1 (1 CPU / 1 worker)"
    assert choose_threads(3, 1, cpus=4, env={}).describe() == "torch threads: 3 (--threads)"
    assert choose_threads(None, 1, cpus=4, env={"OMP_NUM_THREADS": "2"}).describe() == (
        "torch threads: 2 (from OMP_NUM_THREADS)"
    )
    # 4 workers on 2 CPUs (the case that was 7-14x slower with torch's default): told, not refused.
    assert choose_threads(None, 4, cpus=2, env={}).describe() == (
        "torch threads: 1 (2 CPUs / 4 workers; 4 workers x 1 thread oversubscribe 2 usable CPUs)"
    )
    assert choose_threads(2, 2, cpus=2, env={}).oversubscribed


@pytest.mark.parametrize("raw", ["0", "-1", "1.5", "two", "0,2"])
def test_a_bad_omp_num_threads_is_one_line(raw: str) -> None:
    with pytest.raises(
        UserError,
        match=r"^OMP_NUM_THREADS='.*': not a positive whole number \(unset it, or give "
        r"--threads N\)$",
    ):
        choose_threads(None, 1, cpus=2, env={"OMP_NUM_THREADS": raw})
    assert omp_threads({}) is None and omp_threads({"OMP_NUM_THREADS": " 3 "}) == 3


def test_bad_counts_given_to_the_function_are_refused() -> None:
    with pytest.raises(UserError, match="--threads 0"):
        choose_threads(0, 1, cpus=2, env={})
    with pytest.raises(UserError, match="--workers-per-machine 0"):
        choose_threads(None, 0, cpus=2, env={})


def test_usable_cpus_follow_the_affinity_else_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # taskset -c 0, a Slurm binding
        assert usable_cpus() == 1 and choose_threads(None, 1, env={}).threads == 1
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cpus() == 6


@pytest.fixture
def torch_threads():
    """torch's thread count put back after a test that changes it (later tests run in this process)."""
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_apply_sets_torch_and_survives_a_started_interop_pool(torch_threads) -> None:
    torch = torch_threads
    target = 2 if torch.get_num_threads() != 2 else 1
    apply_threads(ThreadChoice(target, "--threads", 2, 1))
    apply_threads(ThreadChoice(target, "--threads", 2, 1))  # the inter-op pool can be sized once: no raise
    assert torch.get_num_threads() == target


@pytest.mark.parametrize("command", ["worker", "run"])
def test_the_command_sets_its_threads_before_loading(
    command: str, toyworld_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture, torch_threads
) -> None:
    """The real path: ``safesearch worker|run ... --threads N`` on a one-trial study of the small world."""
    torch = torch_threads
    target = 2 if torch.get_num_threads() != 2 else 1
    seen: list[int] = []
    from safesearch import search

    real_open = search.open_worker

    def open_worker(*args, **kwargs):  # what torch is told when the model loads
        seen.append(torch.get_num_threads())
        return real_open(*args, **kwargs)

    spec = write_spec(
        tmp_path / "w.yaml",
        spec_dict(tmp_path, toyworld_small, subset=2, n_trials=1, baselines={"zero": True}),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "open_worker", open_worker)
        code, _, err = run_cli(
            capsys,
            command,
            spec,
            "--storage",
            f"sqlite:///{tmp_path / 'w.db'}",
            "--threads",
            target,
            "--workers-per-machine",
            2,
        )
    assert code == 0, err
    assert f"torch threads: {target} (--threads" in err and "trial 0 [zero]: safety=" in err
    assert seen == [target] and torch.get_num_threads() == target
