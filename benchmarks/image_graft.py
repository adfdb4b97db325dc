"""Does the text-derived safety vector restore refusal of image requests? Graft it group by group.

Usage: ``nice -n 19 .venv/bin/python benchmarks/image_graft.py WORLD [--items N] [--scale 0.5 ...]``, where
WORLD is an image-text toy world (``safesearch toyworld build WORLD --modality image-text``).

The graft is the project's own spec, ``studies/toy-image-graft.yaml`` (anchor medical; safety = aligned -
unaligned, Gram-Schmidt against the medical vector), pointed at WORLD. The safety vector is added at each
scale to one part of the medical LLaVA at a time (the vision tower, the projector, the LLM: its embeddings,
layers, norm and head) and to all of them, merged in place as a study's trial is. Every row is the image
world's quick check on the held-out split: harmful requests refused as text and as FigStep images, benign
ones refused both ways, MCQ accuracy both ways, and reading. The aligned checkpoint is the last row, for
reference: the refusal the safety vector was taken from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from safesearch.backends.transformers import TransformersBackend
from safesearch.grafted import open_grafted
from safesearch.graftspec import spec_from_dict
from safesearch.toyworld.image_quickcheck import check_stage, format_table
from safesearch.toyworld.quickcheck import load_holdout

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "studies" / "toy-image-graft.yaml"

# The parts of the LLaVA, as groups of the spec's layer preset: a part is a predicate on group names.
PARTS = {
    "vision tower": lambda g: g == "vision",
    "projector": lambda g: g == "projector",
    "vision + projector": lambda g: g in ("vision", "projector"),
    "LLM": lambda g: g not in ("vision", "projector"),
    "all": lambda g: True,
}


def spec_for(world: Path):
    """The repository's graft spec for the image-text world, its checkpoints at ``world``."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["checkpoints"] = {name: str(world / name) for name in raw["checkpoints"]}
    raw["device"] = "cpu"
    return spec_from_dict(raw, where=str(SPEC))


def group_norms(tau: dict[str, torch.Tensor], group_of: dict[str, str]) -> dict[str, float]:
    """The L2 norm of a vector's tensors in each group: zero where the vector's two checkpoints agree (a
    tower that text-only alignment never trained)."""
    squares: dict[str, float] = {}
    for name, t in tau.items():
        squares[group_of[name]] = squares.get(group_of[name], 0.0) + float(t.double().pow(2).sum())
    return {g: sq**0.5 for g, sq in squares.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("--items", type=int, default=100, help="held-out items per data set (default 100)")
    ap.add_argument("--scale", type=float, action="append", help="safety coefficients to try (default 0.25, 0.5, 1.0)")
    args = ap.parse_args()
    scales = args.scale or [0.25, 0.5, 1.0]
    holdout = load_holdout(args.world, args.items)
    grafted = open_grafted(spec_for(args.world), "transformers", device="cpu")
    merger = grafted.merger
    groups = merger.active_groups()["safety"]
    norms = group_norms(merger.vectors["safety"], merger.grouping.group_of)
    print("the safety vector's norm by group: " + ", ".join(f"{g} {n:.4g}" for g, n in norms.items()))
    rows = []
    start = time.perf_counter()
    grafted.apply(grafted.merger.parse({}))
    rows.append(check_stage("medical", grafted.backend, holdout))
    for scale in scales:
        done: dict[frozenset[str], str] = {}  # the groups a row grafted (where the vector is nonzero) -> row
        for part, chosen in PARTS.items():
            live = frozenset(g for g in groups if chosen(g) and norms.get(g, 0.0) > 0)
            if not live:  # nothing to add: the merge is the medical model, already scored
                print(f"+{scale:g} {part}: the safety vector is zero there, the merge is the medical model")
                continue
            if live in done:
                print(f"+{scale:g} {part}: the same merge as +{scale:g} {done[live]}")
                continue
            done[live] = part
            grafted.apply(merger.parse({"safety": dict.fromkeys(live, scale)}))
            rows.append(check_stage(f"+{scale:g} {part}", grafted.backend, holdout))
            print(format_table(rows[-1:]).splitlines()[1], flush=True)
    rows.append(check_stage("aligned", TransformersBackend.from_pretrained(args.world / "aligned"), holdout))
    print(f"\nheld-out split, first {args.items} items of each set, {time.perf_counter() - start:.0f} s")
    print(format_table(rows))
    plot(rows, args.world / "graft-by-part.png")


def plot(rows: list, path: Path) -> None:
    """Harmful requests refused as text and as images, and MCQ accuracy, for every row: a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.checkpoint for r in rows]
    series = {"harmful text refused": [r.harmful_text_refusal for r in rows],
              "harmful FigStep refused": [r.harmful_image_refusal for r in rows],
              "benign text refused": [r.benign_text_refusal for r in rows],
              "MCQ accuracy (text)": [r.mcq_text_accuracy for r in rows]}
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("the text-derived safety vector grafted onto the medical LLaVA, by part (held-out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
