"""What a trial costs outside its evaluation, on SQLite and on PostgreSQL, side by side in one run.

One worker (the toy study's grafted model and search-split items, loaded once) serves ``--trials`` trials
of a fresh study on each storage in turn, in alternating rounds so that both see the same machine load.
Per trial the worker times: ask (``next_trial``: stale-trial check, budget count, ``study.ask``), suggest,
merge in place, evaluation, record (user attrs, constraints, the responses artifact), tell. The overhead
is everything but the evaluation; the goal is at most 10% of the whole trial.

Run: ``.venv/bin/python benchmarks/search.py [--world storage/toyworld] [--trials 12]``
(``--world`` defaults to storage/toyworld, else the tests' small world; ``--postgres URL`` defaults to
the tests' server, ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import optuna
from transformers.utils import logging as hf_logging

from safesearch.cli.demo import demo_spec
from safesearch.search import TrialOutcome, build_space, ensure_study, groups_of, open_worker
from safesearch.storage import artifact_store_for, mask_url, open_storage
from safesearch.studyspec import Constraint, Objective

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("ask", "suggest", "merge", "eval", "record", "tell", "total")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=None, help="A built toy world (default: storage/toyworld).")
    ap.add_argument("--trials", type=int, default=12, help="Trials per storage (baselines included).")
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--full-splits", action="store_true",
                    help="Score every item of the search splits (the toy spec scores seeded subsets).")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.disable_progress_bar()

    world = args.world or next(
        (p for p in (ROOT / "storage" / "toyworld", ROOT / "storage" / ".test-cache" / "toyworld-small-0")
         if (p / "medical").is_dir()), None)
    if world is None:
        sys.exit("no toy world: build one with `safesearch toyworld build storage/toyworld`")
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    storage_dir = tmp / "storage"
    storage_dir.mkdir()
    # demo_spec reads the world at <storage>/toyworld; the database and artifacts stay in this scratch folder.
    (storage_dir / "toyworld").symlink_to(world.resolve(), target_is_directory=True)
    spec = demo_spec(storage_dir, 0)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    spec = dataclasses.replace(spec, name=name)
    if args.full_splits:
        spec = dataclasses.replace(
            spec,
            objectives=tuple(_every_item(o) for o in spec.objectives),
            constraints=tuple(_every_item(c) for c in spec.constraints),
        )
    space = build_space(spec, *groups_of(spec))
    worker = open_worker(spec, device="cpu", space=space)

    urls = {"sqlite": f"sqlite:///{storage_dir / 'bench.db'}", "postgresql": args.postgres}
    studies, stores = {}, {}
    for kind, url in urls.items():
        storage = open_storage(url, heartbeat_interval=60)
        studies[kind], _ = ensure_study(spec, storage, space)
        stores[kind] = artifact_store_for(url, tmp / f"artifacts-{kind}")
    outcomes: dict[str, list[TrialOutcome]] = {k: [] for k in urls}
    print(f"world {world}, study {name}: {len(space.params)} parameters, "
          f"{sum(len(t.items) for t in worker.tasks.values())} items per trial, {args.trials} trials per storage")
    try:
        for _ in range(args.trials):
            for kind in urls:  # alternate, so that both storages see the same load
                worker.artifact_store = stores[kind]
                worker.work(studies[kind], args.trials, max_trials=1, on_trial=outcomes[kind].append)
    finally:
        for study in studies.values():
            optuna.delete_study(study_name=name, storage=study._storage)
        worker.close()

    print(f"\nmedian seconds per trial over {args.trials} trials (SQLite {urls['sqlite']}, PostgreSQL "
          f"{mask_url(urls['postgresql'])})")
    print(f"{'':12}" + "".join(f"{p:>10}" for p in PARTS) + f"{'outside eval':>15}")
    shares, fixed = {}, {}
    for kind, outs in outcomes.items():
        med = {p: statistics.median(o.seconds[p] for o in outs) for p in PARTS}
        shares[kind] = statistics.median((o.seconds["total"] - o.seconds["eval"]) / o.seconds["total"] for o in outs)
        fixed[kind] = statistics.median(o.seconds["total"] - o.seconds["eval"] for o in outs)
        print(f"{kind:12}" + "".join(f"{med[p]:10.4f}" for p in PARTS) + f"{shares[kind]:14.1%}")
    worst = max(shares.values())
    print(f"\ngoal: time outside evaluation <= 10% of the trial; worst storage: {worst:.1%} "
          f"({'met' if worst <= 0.10 else 'NOT met'})")
    for kind, f in fixed.items():
        print(f"{kind}: {f * 1e3:.0f} ms per trial outside evaluation; 10% holds once a trial's evaluation "
              f"takes >= {9 * f:.2f} s")


def _every_item(x: Objective | Constraint) -> Objective | Constraint:
    """``x`` scoring every item of its suites' splits (no subset)."""
    return dataclasses.replace(x, suites=tuple(dataclasses.replace(r, subset=None) for r in x.suites))


if __name__ == "__main__":
    main()
