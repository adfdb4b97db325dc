"""Build the image-text toy world for one profile and print the timings and the quick-check table.

Usage: ``nice -n 19 .venv/bin/python benchmarks/image_world.py OUT [--profile small|full] [--seed N]
[--items N] [--split holdout|search|train] [--twice]``. ``--split train`` scores the training split instead, which
separates reading that generalizes from reading that was memorized.

What it shows: the build's wall time per stage (issue 19: full <= 10 min, small <= 2 min on 2 cores) and
the cross-modal gap, aligned refusing harmful text far more often than the same requests as FigStep images.
Whether base reads images at all: ``tmpl img`` (held-out harmful images whose answer names the act's
template) against the blind reference printed under the table and against ``tmpl txt``; ``kind img``
(harmful steps for harmful images, benign for benign; 0.5 blind); ``distinct`` (different acts answered
per harmful image; near 0 when every image gets one answer).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from safesearch.toyworld.image_build import build_image_world, weights_digests
from safesearch.toyworld.image_quickcheck import format_table, image_quick_check
from safesearch.toyworld.image_world import IMAGE_PROFILES
from safesearch.toyworld.profiles import Progress


class _Print(Progress):
    """Stage lines and a loss every 50 steps: enough to see a stage that does not learn."""

    def stage_started(self, stage: str, steps: int) -> None:
        print(f"{stage}: {steps} steps", flush=True)

    def step(self, stage: str, loss: float) -> None:
        self._n = getattr(self, "_n", 0) + 1
        if self._n % 50 == 0:
            print(f"  {stage} step {self._n}: loss {loss:.3f}", flush=True)

    def stage_done(self, stage: str, seconds: float, reused: bool) -> None:
        self._n = 0
        print(f"{stage}: {seconds:.1f} s", flush=True)

    def message(self, text: str) -> None:
        print(text, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--profile", default="small", choices=sorted(IMAGE_PROFILES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--items", type=int, default=None, help="items per data set in the check (default: the profile's)")
    ap.add_argument("--split", default="holdout", choices=("holdout", "search", "train"))
    ap.add_argument("--twice", action="store_true", help="build again into OUT-again and compare the weights")
    ap.add_argument("--no-build", action="store_true", help="only run the quick check on an existing OUT")
    args = ap.parse_args()
    profile = IMAGE_PROFILES[args.profile]
    if not args.no_build:
        start = time.perf_counter()
        result = build_image_world(args.out, args.seed, profile, _Print(), quick_check=False)
        total = time.perf_counter() - start
        print("examples (text, image):", result.examples)
        print("seconds:", {k: round(v, 1) for k, v in result.seconds.items()}, f"build total {total:.1f} s")
        if args.twice:
            again = args.out.with_name(args.out.name + "-again")
            build_image_world(again, args.seed, profile, quick_check=False)
            same = weights_digests(args.out) == weights_digests(again)
            print("same seed, bit-identical weights:", same)
    start = time.perf_counter()
    rows = image_quick_check(args.out, args.items or profile.check_items, args.split)
    print(f"quick check ({args.split}) {time.perf_counter() - start:.1f} s")
    print(format_table(rows))


if __name__ == "__main__":
    main()
