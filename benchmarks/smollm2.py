"""Per-trial merge and evaluation time of the SmolLM2 study (a real 135M model), backends side by side.

Runs ``studies/smollm2.yaml`` (its objectives, constraint and groups; no baselines) for a few trials
through the CLI on a built SmolLM2 world, once per backend, and reports per backend the median of each
trial's merge and evaluation seconds and its wall time (start to complete). The evaluation is what the
study scores per trial: 2 x 30 judged harmful generations, 40 MCQs by option log-likelihood, 40 judged
benign generations.

Build the world first (about 20 minutes):
``.venv/bin/safesearch toyworld build storage/smollm2 --family smollm2``, then
``.venv/bin/python benchmarks/smollm2.py [--world storage/smollm2] [--trials 4] [--backends transformers,vllm]``.

On the CPU, vLLM is its CPU build (VLLM_ENABLE_V1_MULTIPROCESSING=0 is set here); on a GPU machine run it
there with the GPU build. Torch threads: the machine's (run nothing else beside it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

# benchmarks/vllm.py would shadow the vllm package for a script run from this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import optuna  # noqa: E402
import yaml  # noqa: E402

from safesearch.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "smollm2.yaml"
GRAFT = ROOT / "studies" / "smollm2-graft.yaml"


def write_specs(tmp: Path, world: Path, backend: str, trials: int) -> Path:
    """The repository's SmolLM2 study pointed at ``world``, without baselines, on ``backend``."""
    graft = yaml.safe_load(GRAFT.read_text())
    graft["checkpoints"] = {name: str(world / name) for name in graft["checkpoints"]}
    (tmp / "graft.yaml").write_text(yaml.safe_dump(graft, sort_keys=False))
    study = yaml.safe_load(STUDY.read_text())
    study.update(name=f"bench-{backend}", graft="graft.yaml", data_root=str(world), n_trials=trials,
                 baselines={"zero": False}, backend=backend)
    study["backend_options"] = {"batch_size": 32} if backend == "transformers" else {}
    path = tmp / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_backend(backend: str, world: Path, trials: int, tmp: Path) -> dict[str, float]:
    spec = write_specs(tmp, world, backend, trials)
    url = f"sqlite:///{tmp / f'{backend}.db'}"
    try:
        cli(["run", str(spec), "--storage", url])
    except SystemExit as e:
        if e.code:
            raise
    study = optuna.load_study(study_name=f"bench-{backend}", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "trials": len(done),
        "merge (s)": statistics.median(t.user_attrs["seconds"]["merge"] for t in done),
        "eval (s)": statistics.median(t.user_attrs["seconds"]["eval"] for t in done),
        "trial wall (s)": statistics.median((t.datetime_complete - t.datetime_start).total_seconds() for t in done),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=ROOT / "storage" / "smollm2", help="A built SmolLM2 world.")
    ap.add_argument("--trials", type=int, default=4, help="Trials per backend.")
    ap.add_argument("--backends", default="transformers,vllm", help="Comma-separated: transformers, vllm.")
    args = ap.parse_args()
    if not (args.world / "medical" / "config.json").is_file():
        raise SystemExit(f"--world {args.world}: no built SmolLM2 world there (see this file's docstring)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp:
        for backend in args.backends.split(","):
            try:
                results[backend] = run_backend(backend, args.world.resolve(), args.trials, Path(tmp))
            except (Exception, SystemExit) as e:  # one backend's failure is its column, not the end of the run
                print(f"{backend}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            print(f"{backend}: {results[backend]}", flush=True)
    if not results:
        raise SystemExit("no backend completed")
    rows = next(iter(results.values())).keys()
    print(f"\n| median per trial (SmolLM2-135M, fp32) | {' | '.join(results)} |")
    print(f"|---|{'---|' * len(results)}")
    for row in rows:
        cells = [f"{r[row]:.3f}" if isinstance(r[row], float) else str(r[row]) for r in results.values()]
        print(f"| {row} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
