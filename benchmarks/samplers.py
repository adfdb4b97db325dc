"""Samplers against the paper's procedure, at equal trial budgets: hypervolume of the holdout-validated front.

For each arm and sampler seed, one study of the toy study's search space (``studies/toy.yaml``: 14
coefficients, safety and MCQ accuracy maximised, over-refusal at most 0.05 at 90% confidence, every item
of the search split scored) runs up to the largest budget
on one worker (the grafted model loaded once). For each budget B, the front of its first B trials (the
search split, feasible ones) is validated on holdout (every front trial re-scored on the holdout items,
cached per trial), and its hypervolume is computed over the front trials that are feasible on holdout:

    HV = area dominated by the (holdout safety, holdout MCQ accuracy) points, reference point (0, 0)

so a front that keeps the medical model's accuracy and restores all of the safety scores near 1, and one
that is infeasible on holdout scores 0. Arms:

- ``tpe`` (the default), ``nsga2``, ``gp``, ``random``: the multi-objective samplers, constraint-aware;
- ``cmaes-weighted``: the paper's procedure, CMA-ES on 0.5 safety + 0.5 medical (constraints unseen by
  the sampler; the front reads them);
- ``grid``: the global-lambda grid, B values of one safety coefficient for every group evenly over
  [0, 1] (the medical vector at 0): deterministic, so its spread is 0;
- ``tpe+early-stop``: TPE with ``early_stop`` (half of each suite first, 95% confidence); its budget
  counts COMPLETE trials, and the stopped trials' evaluation seconds are counted too.

None of the arms is given the study's baselines: the budget is theirs alone.

Early stopping is judged on evaluation seconds: the seconds ``tpe+early-stop`` spent until its holdout
front came within 2% of the hypervolume of the full ``tpe`` run at the largest budget, against the
seconds the full run spent in all (and until it came within 2% of its own final front).

Run (two processes split the arms, then ``--report`` joins them; with every search item scored, an 80-trial
TPE run takes 6-9 minutes of a loaded 2-core machine, GP's 3-4x that)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers.py --world /tmp/d0/toyworld --out /tmp/samplers \\
        --arms tpe tpe+early-stop grid cmaes-weighted &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers.py --world /tmp/d0/toyworld --out /tmp/samplers \\
        --arms nsga2 gp random; wait
    .venv/bin/python benchmarks/samplers.py --out /tmp/samplers --report
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/samplers.py` puts benchmarks/ first on sys.path, where benchmarks/vllm.py would shadow
# the vllm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

ARMS = ("tpe", "nsga2", "gp", "random", "cmaes-weighted", "grid", "tpe+early-stop")
WITHIN = 0.02  # early stopping: "a front whose hypervolume is within 2% of the full run's"


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by maximised 2-D points over the reference point (0, 0)."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, reverse=True):  # by safety, highest first
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def run_arm(arm: str, seed: int, budgets: list[int], worker: Any, holdout_tasks: Any, base_spec: Any,
            cache: dict) -> dict[str, Any]:
    import optuna

    from safesearch.pareto import front, records
    from safesearch.search import holdout_scores
    from safesearch.storage import open_storage
    from safesearch.studyspec import Baselines, EarlyStop, SamplerSpec

    top = max(budgets)
    spec = dataclasses.replace(base_spec, name=f"{arm}-{seed}", seed=seed, n_trials=top,
                               baselines=Baselines(zero=False), early_stop=None)
    if arm == "cmaes-weighted":
        spec = dataclasses.replace(spec, sampler=SamplerSpec("cmaes-weighted", {}, {"safety": 0.5, "medical": 0.5}))
    elif arm == "tpe+early-stop":
        spec = dataclasses.replace(spec, sampler=SamplerSpec("tpe"), early_stop=EarlyStop(0.5, 0.95))
    elif arm != "grid":
        spec = dataclasses.replace(spec, sampler=SamplerSpec(arm))
    directions = {o.name: o.direction for o in spec.objectives}
    runs: list[tuple[int, list[Any], list[Any]]] = []  # (budget, the trials in order, COMPLETE records)
    with tempfile.TemporaryDirectory(prefix="bench-samplers-") as tmp:
        if arm == "grid":  # one study per budget: its grid is B values
            for b in budgets:
                values = tuple(round(i / (b - 1), 6) for i in range(b))
                s = dataclasses.replace(spec, name=f"grid-{b}", n_trials=b, sampler=SamplerSpec("random"),
                                        baselines=Baselines(False, "safety", values))
                study = _work(s, worker, open_storage(f"sqlite:///{tmp}/g{b}.db"))
                runs.append((b, study.get_trials(), records(study)))
        else:
            study = _work(spec, worker, open_storage(f"sqlite:///{tmp}/s.db"))
            trials = study.get_trials()
            every = records(study)
            for b in budgets:
                # The first trials (by number) up to the B-th COMPLETE one.
                complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE][:b]
                last = complete[-1].number if complete else -1
                runs.append((b, [t for t in trials if t.number <= last], [r for r in every if r.number <= last]))

        def validated(r: Any) -> dict[str, Any]:
            # Holdout scores are a function of the coefficients alone: shared by every arm and seed.
            key = json.dumps(r.coefficients, sort_keys=True)
            if key not in cache:
                worker.grafted.apply(r.coefficients)
                cache[key] = holdout_scores(spec, worker.grafted.backend, holdout_tasks)
            return cache[key]

        def hv_of(rs: list[Any]) -> tuple[float, list[dict[str, Any]], float]:
            """(HV of the front's holdout-feasible points, the points, HV of every front point on holdout)."""
            pts = []
            for r in front(rs, directions):
                h = validated(r)
                pts.append({"trial": r.number, "search": r.scores, "holdout": h["scores"],
                            "over_refusal": h["constraint_scores"], "feasible": h["feasible"]})
            xy = [(p["holdout"]["safety"], p["holdout"]["medical"]) for p in pts]
            return hypervolume([q for q, p in zip(xy, pts, strict=True) if p["feasible"]]), pts, hypervolume(xy)

        out: dict[str, Any] = {"arm": arm, "seed": seed, "budgets": {}}
        for b, trials, rs in runs:
            hv, pts, hv_any = hv_of(rs)
            out["budgets"][str(b)] = {
                "hv": hv, "hv_any": hv_any, "front": pts, "n_trials": len(trials), "n_complete": len(rs),
                "n_stopped": sum(t.state.name == "PRUNED" for t in trials),
                "eval_s": sum(t.user_attrs.get("seconds", {}).get("eval", 0.0) for t in trials),
            }
        if arm in ("tpe", "tpe+early-stop"):
            # Holdout HV after each COMPLETE trial, against the evaluation seconds spent so far.
            _, trials, _ = runs[-1]
            curve, spent, items = [], 0.0, 0
            for t in trials:
                spent += t.user_attrs.get("seconds", {}).get("eval", 0.0)
                items += _items(t)
                if t.state.name == "COMPLETE":
                    curve.append((spent, hv_of([r for r in every if r.number <= t.number])[0], items))
            out["curve"] = curve
    return out


def _items(t: Any) -> int:
    """The items a trial scored: every item of its suites, or the first slice of a stopped one (a measure
    of evaluation work that machine load does not change)."""
    suites = t.user_attrs.get("suites") or t.user_attrs.get("early_stop", {}).get("suites", {})
    return int(sum(m.get("n", 0) for m in suites.values()))


def _work(spec: Any, worker: Any, storage: Any) -> Any:
    from safesearch.search import ensure_study

    worker.spec = spec
    study, _ = ensure_study(spec, storage, worker.space)
    t0 = time.perf_counter()
    worker.work(study, spec.n_trials)
    print(f"  {spec.name}: {len(study.get_trials())} trials in {time.perf_counter() - t0:.0f} s", flush=True)
    return study


def measure(args: argparse.Namespace) -> None:
    import optuna
    import torch
    from transformers.utils import logging as hf_logging

    from safesearch.cli.demo import demo_spec
    from safesearch.search import build_space, groups_of, holdout_refs, open_worker, prepare_tasks

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.disable_progress_bar()
    scratch = Path(tempfile.mkdtemp(prefix="bench-samplers-"))
    (scratch / "toyworld").symlink_to(args.world.resolve(), target_is_directory=True)
    spec = demo_spec(scratch, 0)
    space = build_space(spec, *groups_of(spec))
    worker = open_worker(spec, device="cpu", space=space)
    holdout_tasks = prepare_tasks(holdout_refs(spec), spec.data_root)
    args.out.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    try:
        for arm in args.arms:
            for seed in ([0] if arm == "grid" else args.seeds):
                path = args.out / f"{arm}-{seed}.json"
                if path.exists():
                    continue
                t0 = time.perf_counter()
                result = run_arm(arm, seed, args.budgets, worker, holdout_tasks, spec, cache)
                result["wall_s"] = time.perf_counter() - t0
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1))
                tmp.rename(path)
                hv = {b: round(v["hv"], 3) for b, v in result["budgets"].items()}
                print(f"{arm} seed {seed}: holdout HV by budget {hv} ({result['wall_s']:.0f} s)", flush=True)
    finally:
        worker.close()


def _spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def report(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    budgets = sorted({int(b) for r in results for b in r["budgets"]})
    print("holdout hypervolume of the validated front, reference (0, 0), mean ± sd over sampler seeds "
          "(evaluation seconds per run in brackets)")
    print("| arm | seeds | " + " | ".join(f"{b} trials" for b in budgets) + " |")
    print("|---|---:|" + "---:|" * len(budgets))
    for arm in [a for a in ARMS if a in by_arm]:
        rs = by_arm[arm]
        cells = []
        for b in budgets:
            hv = [r["budgets"][str(b)]["hv"] for r in rs if str(b) in r["budgets"]]
            ev = [r["budgets"][str(b)]["eval_s"] for r in rs if str(b) in r["budgets"]]
            stopped = [r["budgets"][str(b)]["n_stopped"] for r in rs if str(b) in r["budgets"]]
            extra = f", {statistics.mean(stopped):.0f} stopped" if any(stopped) else ""
            cells.append(f"{_spread(hv)} ({statistics.mean(ev):.0f} s{extra})" if hv else "-")
        print(f"| {arm} | {len(rs)} | " + " | ".join(cells) + " |")
    print("\nthe same fronts, every front trial counted on holdout whether or not it keeps the over-refusal "
          "bound there (what the samplers reach, apart from whether the constraint transfers)")
    print("| arm | " + " | ".join(f"{b} trials" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for arm in [a for a in ARMS if a in by_arm]:
        cells = [_spread([r["budgets"][str(b)]["hv_any"] for r in by_arm[arm] if str(b) in r["budgets"]])
                 for b in budgets]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    if "tpe" in by_arm and "tpe+early-stop" in by_arm:
        print(f"\nearly stopping: evaluation seconds until the holdout front is within {WITHIN:.0%} of the full "
              "TPE run's final hypervolume")
        print("| seed | full TPE: final HV, its seconds (reaching 98% of it) | early stop: seconds to 98% of full's "
              "| ratio | the same in items scored: full (to 98%) / early stop | ratio |")
        print("|---:|---|---|---:|---|---:|")
        full = {r["seed"]: r for r in by_arm["tpe"]}
        for r in sorted(by_arm["tpe+early-stop"], key=lambda r: r["seed"]):
            f = full.get(r["seed"])
            if f is None:
                continue
            top = str(max(int(b) for b in f["budgets"]))
            target = (1 - WITHIN) * f["budgets"][top]["hv"]
            total = f["budgets"][top]["eval_s"]
            own = next((c for c in f["curve"] if c[1] >= target), None)
            es = next((c for c in r["curve"] if c[1] >= target), None)
            es_cell = f"{es[0]:.0f} s" if es is not None else f"never (final HV {r['curve'][-1][1]:.3f})"
            ratio = f"{total / es[0]:.2f}x" if es else "-"
            if len(f["curve"][-1]) > 2 and es is not None and len(es) > 2:
                items = (f"{f['curve'][-1][2]} ({own[2] if own else '-'}) / {es[2]}", f"{f['curve'][-1][2] / es[2]:.2f}x")
            else:
                items = ("-", "-")
            print(f"| {r['seed']} | {f['budgets'][top]['hv']:.3f}, {total:.0f} s ({own[0]:.0f} s) | {es_cell} | {ratio} "
                  f"| {items[0]} | {items[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path("storage/toyworld"), help="A built toy world (full profile).")
    ap.add_argument("--out", type=Path, required=True, help="Where each arm and seed's result goes (JSON); reused.")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", type=int, default=[20, 40, 80])
    ap.add_argument("--report", action="store_true", help="Print the tables from --out's results.")
    args = ap.parse_args()
    if args.report:
        report(args.out)
        return
    if not (args.world / "medical").is_dir():
        sys.exit(f"{args.world}: no toy world (build one with `safesearch toyworld build {args.world}`)")
    measure(args)
    report(args.out)


if __name__ == "__main__":
    main()
