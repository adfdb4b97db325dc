"""Per trial, side by side in one run: the merge inside vLLM's worker against restarting the engine on an
exported checkpoint (what a search without resident weights pays).

For each trial (random coefficients, seeded), both paths reach the same weights and score the same toy
world suites (safety on both harmful suites, MCQ by log-likelihood, search split):

* ``live``: ``VLLMGrafted.apply`` (the merge inside the worker, through vLLM's weight loading, plus the
  cache resets) and the evaluation on the one engine started at the beginning;
* ``restart``: ``export_merged`` (merged tensors written as safetensors, fsync, provenance hashes), a new
  ``vllm.LLM`` on that directory, the same evaluation, the engine's shutdown. The new engine starts in this
  process, where vLLM is imported and its kernels compiled already: the restart path's best case (a search
  that restarts vLLM as a new process also pays the import and the compilation every trial).

The outcomes of both paths are compared item by item (they must be equal: same weights). Run by hand:
``.venv/bin/python benchmarks/vllm.py`` (``--world`` a built toy world; default: the tests' small one,
built if missing; ``--trials``, ``--items``). CPU figures depend on the machine's load: the table prints
the load average next to them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the vllm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import yaml  # noqa: E402

from safesearch.backends.vllm import VLLMBackend, VLLMGrafted  # noqa: E402
from safesearch.evaluate import evaluate, load_items  # noqa: E402
from safesearch.export import export_merged  # noqa: E402
from safesearch.graftspec import spec_from_dict  # noqa: E402
from safesearch.suites import load_suite  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("toy-harmful-general", "toy-harmful-medical", "toy-mcq-medical")


def toy_spec(world: Path):
    data = yaml.safe_load((ROOT / "studies" / "toy-graft.yaml").read_text())
    data["checkpoints"] = {name: str(world / name) for name in data["checkpoints"]}
    return spec_from_dict(data)


def tasks_for(world: Path, scratch: Path, items: int, mcq: int) -> list:
    root = world.resolve()  # the toy suites' paths (data/{split}/...) are relative to the world
    out = []
    for name in SUITES:
        suite = load_suite(name, [ROOT / "objectives"])
        suite = replace(suite, dataset=replace(suite.dataset, split="search"))
        out.append((suite, load_items(suite, root, limit=mcq if suite.metric == "mcq_loglik" else items)))
    return out


def score(backend, tasks) -> list:
    return [[o.as_dict() for o in evaluate(backend, s, items).items] for s, items in tasks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=ROOT / "storage" / ".test-cache" / "toyworld-small-0")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--items", type=int, default=32, help="items per safety suite")
    ap.add_argument("--mcq", type=int, default=12, help="MCQ items (4 options each)")
    ap.add_argument("--kv-cache-mb", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.world / "medical").is_dir():
        from safesearch.toyworld.build import build

        print(f"building the small toy world at {args.world} ...")
        build(args.world, seed=0, profile="small")
    engine = {"kv_cache_memory_bytes": args.kv_cache_mb << 20}
    scratch = Path(tempfile.mkdtemp(prefix="safesearch-vllm-bench-"))
    try:
        spec = toy_spec(args.world)
        tasks = tasks_for(args.world, scratch, args.items, args.mcq)
        n_requests = sum(len(items) * (4 if s.metric == "mcq_loglik" else 1) for s, items in tasks)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        grafted = VLLMGrafted(spec, **engine)
        start_live = time.perf_counter() - t0
        info = grafted.info
        print(f"machine: {os.cpu_count()} cores, load average {load0:.2f}; toy world {args.world.name}; "
              f"{n_requests} requests per trial ({', '.join(s.name for s, _ in tasks)})")
        print(f"live engine: started + merger built in the worker in {start_live:.1f}s (once); mode "
              f"{info['mode']}, {info['merged']} merged tensors, {info['resident_bytes'] / 1e6:.1f} MB resident")
        t0 = time.perf_counter()
        for _ in range(2):  # vLLM's CPU sampler compiles per new shape: warm it for both paths alike
            score(grafted.backend, tasks)
        print(f"warm-up (two untimed evaluations): {time.perf_counter() - t0:.1f}s")
        rng = random.Random(args.seed)
        groups = grafted.merger.active_groups()
        header = (f"{'trial':>5} | {'merge':>7} {'eval':>6} {'live':>6} | {'export':>6} {'start':>6} {'eval':>6} "
                  f"{'close':>6} {'restart':>7} | {'ratio':>6} same")
        print(header)
        print("-" * len(header))
        totals = {"live": 0.0, "restart": 0.0, "merge": 0.0, "swap": 0.0}
        for trial in range(args.trials):
            table = {v: {g: rng.uniform(0.0, 2.0) if v == "safety" else rng.uniform(-0.5, 0.5) for g in gs}
                     for v, gs in groups.items()}
            coefs = grafted.merger.parse(table)
            t0 = time.perf_counter()
            grafted.apply(coefs)
            t1 = time.perf_counter()
            live = score(grafted.backend, tasks)
            t2 = time.perf_counter()
            out = export_merged(grafted.merger, coefs, scratch / f"trial-{trial}")
            t3 = time.perf_counter()
            fresh = VLLMBackend.from_pretrained(out, **engine)
            t4 = time.perf_counter()
            restarted = score(fresh, tasks)
            t5 = time.perf_counter()
            fresh.close()
            t6 = time.perf_counter()
            shutil.rmtree(out)
            live_s, restart_s = t2 - t0, t6 - t2
            totals["live"] += live_s
            totals["restart"] += restart_s
            totals["merge"] += t1 - t0
            totals["swap"] += (t4 - t2) + (t6 - t5)  # export, start, close: what the live path does not pay
            print(f"{trial:>5} | {t1 - t0:>6.3f}s {t2 - t1:>5.2f}s {live_s:>5.2f}s | {t3 - t2:>5.2f}s {t4 - t3:>5.2f}s "
                  f"{t5 - t4:>5.2f}s {t6 - t5:>5.2f}s {restart_s:>6.2f}s | {restart_s / live_s:>5.1f}x "
                  f"{'yes' if live == restarted else 'NO'}")
        n = args.trials
        print(f"mean per trial: live {totals['live'] / n:.2f}s, restart {totals['restart'] / n:.2f}s "
              f"({totals['restart'] / totals['live']:.1f}x); the part that differs (the evaluations are the same "
              f"work): merge {totals['merge'] / n:.3f}s vs export + start + close {totals['swap'] / n:.2f}s "
              f"({totals['swap'] / totals['merge']:.0f}x); load average now {os.getloadavg()[0]:.2f}")
        grafted.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
