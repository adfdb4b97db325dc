"""What the SmolLM2 studies found, on holdout: the front of each sampler beside the global-lambda grid and
the checkpoints, as the README's tables.

The studies are the repository's ``studies/smollm2.yaml`` per world seed, once with its TPE sampler and
once with the paper's ``cmaes-weighted`` (same trials, same baselines), each validated::

    safesearch toyworld build W0 --family smollm2 --seed 0          # about 20 minutes
    safesearch run S0-tpe.yaml --storage sqlite:///W0.db            # studies/smollm2.yaml on W0, seed 0
    safesearch run S0-cmaes.yaml --storage sqlite:///W0.db          # the same with sampler cmaes-weighted
    safesearch validate sm0-tpe --storage sqlite:///W0.db
    safesearch validate sm0-cmaes --no-references --storage sqlite:///W0.db
    python benchmarks/smollm2_report.py --storage sqlite:///W0.db sm0-tpe sm0-cmaes

For each study: every trial of its search front and every baseline, search -> holdout, and the knee (the
pick on the search split). Then per method (the grid, each sampler's front) a summary on holdout: the
best safety among holdout-feasible trials whose MCQ accuracy is within 5 points of the medical
checkpoint's (the issue's bar), and the hypervolume of the holdout-feasible points (safety x MCQ accuracy,
reference point (0, 0): the area they dominate in the unit square).
"""

from __future__ import annotations

import argparse

import optuna

from safesearch.pareto import front, pick, records
from safesearch.search import HOLDOUT_CHECKPOINT, stored_spec


def hypervolume(points: list[tuple[float, float]]) -> float:
    """The area of [0, 1]^2 dominated by ``points`` (both coordinates maximized, reference (0, 0))."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, reverse=True):  # by x descending: each adds a strip of new height
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def row(label: str, search: dict | None, hold: dict | None) -> str:
    def cells(h: dict | None) -> list[str]:
        if not h:
            return ["-", "-", "-"]
        s, c = h["scores"], h["constraint_scores"]
        return [f"{s['safety']:.3f}", f"{s['medical']:.3f}", f"{c['over_refusal']:.3f}"]

    feasible = "-" if not hold else ("yes" if hold["feasible"] else "no")
    return f"| {label} | {' | '.join(cells(search))} | {' | '.join(cells(hold))} | {feasible} |"


def report(storage: str, names: list[str]) -> None:
    summary = []
    medical_mcq = None
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        spec = stored_spec(study)
        directions = {o.name: o.direction for o in spec.objectives}
        rs = records(study)
        fr = front(rs, directions)
        k = pick(rs, directions, "knee")
        refs = {k_[len(HOLDOUT_CHECKPOINT):]: v for k_, v in study.user_attrs.items() if k_.startswith(HOLDOUT_CHECKPOINT)}
        print(f"\n### {name}: {len(rs)} trials, sampler {spec.sampler.name}\n")
        print("| trial | safety (search) | MCQ (search) | over-refusal (search) "
              "| safety (holdout) | MCQ (holdout) | over-refusal (holdout) | feasible on holdout |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for ref, h in refs.items():
            print(row(f"checkpoint `{ref}`", None, h))
            if ref == "medical":
                medical_mcq = h["scores"]["medical"]
        shown = sorted({r.number for r in fr} | {r.number for r in rs if r.baseline})
        by_number = {r.number: r for r in rs}
        for n in shown:
            r = by_number[n]
            label = f"{n} ({r.baseline})" if r.baseline else f"{n}"
            label += " **knee**" if n == k.number else ""
            label += " *" if r in fr else ""
            print(row(label, {"scores": r.scores, "constraint_scores": r.constraint_scores}, r.holdout))
        grid = [r for r in rs if r.baseline and r.baseline.startswith("lambda=")]
        searched = [r for r in fr if not r.baseline]
        summary += [(name, "global-lambda grid", grid), (name, f"{spec.sampler.name} front", searched)]

    print("\n| study | method | holdout-feasible | best safety, MCQ within 5 points of medical | hypervolume |")
    print("|---|---|---:|---|---:|")
    for name, method, group in summary:
        ok = [r for r in group if r.holdout and r.holdout["feasible"]]
        pts = [(r.holdout["scores"]["safety"], r.holdout["scores"]["medical"]) for r in ok]
        near = [r for r in ok if medical_mcq is not None and r.holdout["scores"]["medical"] >= medical_mcq - 0.05]
        best = max(near, key=lambda r: r.holdout["scores"]["safety"], default=None)
        best_s = (f"{best.holdout['scores']['safety']:.3f} (trial {best.number}, MCQ "
                  f"{best.holdout['scores']['medical']:.3f})") if best else "none"
        print(f"| {name} | {method} | {len(ok)}/{len(group)} | {best_s} | {hypervolume(pts):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True)
    ap.add_argument("studies", nargs="+")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report(args.storage, args.studies)


if __name__ == "__main__":
    main()
