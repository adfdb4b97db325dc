"""How long the CLI takes to answer before any real work: help, version, an early refusal; before and after
the lazy imports, side by side in one run.

``before`` is the package at ``--before`` (default ``d3fbcbc^``, the commit before the CLI stopped importing
torch, transformers and vLLM at start-up), checked out into a scratch git worktree; ``after`` is this
checkout. Both run with this venv's Python as ``python -m safesearch ARGS`` (``PYTHONPATH`` set to the
tree's root, which comes before the editable install on ``sys.path``), alternating, ``--repeat`` times
each; the table shows the median wall time of each command and the ratio.

Run: ``.venv/bin/python benchmarks/startup.py [--repeat 7] [--before REV]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a user types before any real work, and what it should answer with (exit code).
COMMANDS: list[tuple[str, list[str], int]] = [
    ("--help", ["--help"], 0),
    ("--version", ["--version"], 0),
    ("run --help", ["run", "--help"], 0),
    ("export --help", ["export", "--help"], 0),
    ("run on a missing spec", ["run", "no-such-spec.yaml"], 2),
    ("pareto, bad storage URL", ["pareto", "demo", "--storage", "nosuchdb://x"], 2),
]


def timed(root: Path, args: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "safesearch", *args], cwd=tempfile.gettempdir(), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, done.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--before", default="d3fbcbc^", help="The git revision to compare with.")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    before = scratch / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(before), args.before], check=True)
    try:
        trees = {"before": before, "after": ROOT}
        times: dict[tuple[str, str], list[float]] = {}
        codes: dict[tuple[str, str], int] = {}
        for _ in range(args.repeat):
            for label, argv, _ in COMMANDS:
                for arm, root in trees.items():  # alternate, so that both see the same load
                    s, code = timed(root, argv)
                    times.setdefault((label, arm), []).append(s)
                    codes[label, arm] = code
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(f"median wall seconds of {args.repeat} runs, before = {args.before}, after = this checkout")
    print(f"{'command':28}{'before':>9}{'after':>9}{'ratio':>8}  exit (before/after, expected)")
    for label, _, expected in COMMANDS:
        b, a = (statistics.median(times[label, arm]) for arm in ("before", "after"))
        print(f"{label:28}{b:9.2f}{a:9.2f}{b / a:7.1f}x  {codes[label, 'before']}/{codes[label, 'after']}, {expected}")


if __name__ == "__main__":
    main()
