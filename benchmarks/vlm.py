"""Per-trial merge and evaluation time of a study on tiny image-text models, CPU, both families side by side.

For each family (Qwen2.5-VL as Lingshu / HuatuoGPT-Vision are laid out; LLaVA in the llava-hf layout) a
tiny random family (unaligned, aligned, medical) is built from configs and a study is run through the
CLI (`safesearch run`), as tests/test_study_qwen2_5_vl.py runs it: FigStep and direct safety on 4 harmful
requests each, an image MCQ on 3 questions (4 options), over-refusal on 3 benign requests; LLM blocks and
the projector searched, the vision tower frozen. Each trial records its merge and evaluation seconds;
the table gives their medians, and the trial's wall time (start to complete) beside them.

Run: ``.venv/bin/python benchmarks/vlm.py [--trials 12]``. The models are random: the scores mean nothing,
only the times do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import build_tiny_llava_hf, build_tiny_qwen2_5_vl, finetuned_copy  # noqa: E402
from vlm_world import FROZEN_TOWER, corpus, study_spec, write_data, write_spec, write_suites  # noqa: E402

from safesearch.cli import main as cli  # noqa: E402

BUILDERS = {
    "qwen2_5_vl": lambda path: build_tiny_qwen2_5_vl(path, seed=21, vocab_size=None, corpus=corpus()),
    "llava": lambda path: build_tiny_llava_hf(path, seed=21, corpus=corpus()),
}


def run_family(name: str, tmp: Path, trials: int) -> dict[str, float]:
    root = tmp / name
    unaligned = BUILDERS[name](root / "models" / "unaligned")
    aligned = finetuned_copy(unaligned, root / "models" / "aligned", seed=22, scale=0.02)
    medical = finetuned_copy(aligned, root / "models" / "medical", seed=23, scale=0.02)
    write_data(root / "data")
    family = {"unaligned": unaligned, "aligned": aligned, "medical": medical}
    spec = write_spec(root / "study.yaml", study_spec(name, family, root / "data", write_suites(root),
                                                      n_trials=trials, frozen=FROZEN_TOWER[name]))
    url = f"sqlite:///{root / 'study.db'}"
    try:
        cli(["run", str(spec), "--storage", url])
    except SystemExit as e:
        if e.code:
            raise
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    model = medical / "model.safetensors"
    return {
        "trials": len(done),
        "model file (MB)": model.stat().st_size / 1e6,
        "merge (s)": statistics.median(t.user_attrs["seconds"]["merge"] for t in done),
        "eval (s)": statistics.median(t.user_attrs["seconds"]["eval"] for t in done),
        "trial wall (s)": statistics.median((t.datetime_complete - t.datetime_start).total_seconds() for t in done),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12, help="Trials per family (the 2 baselines included).")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-vlm-") as tmp:
        results = {name: run_family(name, Path(tmp), args.trials) for name in BUILDERS}
    rows = next(iter(results.values())).keys()
    print(f"\n| median per trial | {' | '.join(results)} |")
    print(f"|---|{'---|' * len(results)}")
    for row in rows:
        cells = [f"{r[row]:.3f}" if isinstance(r[row], float) else str(r[row]) for r in results.values()]
        print(f"| {row} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
