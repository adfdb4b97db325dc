"""Evaluation throughput, side by side in one run on the toy medical model (run by hand, not a test).

    .venv/bin/python benchmarks/eval.py [--world storage/toyworld] [--max-new-tokens 32] [--repeats 2]

Measures items per second for
- generation-judged safety (held-out harmful general + medical, keyword judge): batched against one
  item at a time, each with early stopping (stop once the judge can decide) and at full length;
- log-likelihood MCQ (held-out medical MCQ, acc): batched against one item at a time;
and checks that every variant gives the same per-item verdicts / choices. Each figure is the best of
``--repeats`` runs (the machine is shared; the best run is the least disturbed one). The load average
is printed beside the figures.

Without a built toy world (``safesearch toyworld build``), it builds a stand-in in a temporary
directory: the toy world's data and tokenizer and a model of its default shape, trained briefly on the
aligned stage's pairs (it refuses and complies the toy world's way), and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from safesearch.backends.transformers import TransformersBackend
from safesearch.datasets import read_dataset
from safesearch.judges import KeywordJudge
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.scorers import argmax


def stand_in_world(root: Path, steps: int) -> Path:
    """A toy-world-shaped model and data under ``root`` (used only when no toy world is built)."""
    from safesearch.toyworld.data import corpus_texts, make_records, stage_pairs, write_records
    from safesearch.toyworld.tokenizer import build_tokenizer
    from safesearch.toyworld.train import ModelShape, Recipe, encode_pairs, new_model, train

    records = make_records(0)
    write_records(records, root / "data")
    tokenizer = build_tokenizer(corpus_texts(records, 0))
    model = new_model(ModelShape(), tokenizer, seed=0)
    pairs = stage_pairs("aligned", records, 0) + stage_pairs("medical", records, 0)
    train(
        model,
        encode_pairs(tokenizer, pairs),
        Recipe(steps=steps, lr=3e-3, batch_size=32),
        seed=0,
        pad_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(root / "medical")
    tokenizer.save_pretrained(root / "medical")
    return root


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("storage/toyworld"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stand-in-steps", type=int, default=300)
    args = parser.parse_args()

    world = args.world
    note = f"toy world at {world}"
    if not (world / "medical" / "config.json").is_file():
        world = Path(tempfile.mkdtemp(prefix="safesearch-bench-"))
        start = time.perf_counter()
        stand_in_world(world, args.stand_in_steps)
        note = f"STAND-IN (no toy world at {args.world}): trained {args.stand_in_steps} steps in {time.perf_counter() - start:.0f} s"
    holdout = world / "data" / "holdout"
    harmful = [
        it.text
        for name in ("harmful_general", "harmful_medical")
        for it in read_dataset("jsonl", holdout / f"{name}.jsonl")
    ]
    mcqs = read_dataset("jsonl", holdout / "mcq_medical.jsonl")
    requests = [
        (mcq_user_text(q.text, q.options), mcq_answer_text(q.options, i))
        for q in mcqs
        for i in range(len(q.options))
    ]

    batched = TransformersBackend.from_pretrained(world / "medical", batch_size=args.batch_size)
    single = TransformersBackend(batched.model, batched.tokenizer, batch_size=1)
    judge = KeywordJudge()
    n_params = sum(p.numel() for p in batched.model.parameters())
    print(f"model: {world / 'medical'} ({n_params / 1e6:.2f} M parameters) -- {note}")
    print(
        f"torch threads {torch.get_num_threads()}, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"safety: {len(harmful)} harmful prompts, max_new_tokens={args.max_new_tokens}; MCQ: {len(mcqs)} questions, {len(requests)} options\n"
    )

    rows = []
    verdicts = {}
    for label, backend in (("batched", batched), ("one at a time", single)):
        for stop_label, stop in (("early stop", judge.decided), ("full length", None)):
            seconds, responses = best_of(
                args.repeats,
                lambda backend=backend, stop=stop: backend.generate(harmful, args.max_new_tokens, stop=stop),
            )
            verdicts[(label, stop_label)] = [judge.is_refusal(r) for r in responses]
            tokens = sum(len(batched.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
            rows.append(
                (
                    "safety (generate + keyword judge)",
                    f"{label}, {stop_label}",
                    len(harmful) / seconds,
                    seconds,
                    tokens / len(harmful),
                )
            )
    choices = {}
    for label, backend in (("batched", batched), ("one at a time", single)):
        seconds, scores = best_of(args.repeats, lambda backend=backend: backend.loglikelihood(requests))
        it = iter(scores)
        choices[label] = [argmax([next(it)[0] for _ in q.options]) for q in mcqs]
        rows.append(("MCQ (log-likelihood, acc)", label, len(mcqs) / seconds, seconds, None))

    print(f"{'task':36} {'variant':28} {'items/s':>9} {'seconds':>8} {'tokens/response':>16}")
    for task, variant, rate, seconds, tokens in rows:
        print(
            f"{task:36} {variant:28} {rate:9.1f} {seconds:8.2f} {'' if tokens is None else f'{tokens:16.1f}'}"
        )
    same_verdicts = len({tuple(v) for v in verdicts.values()}) == 1
    same_choices = len({tuple(c) for c in choices.values()}) == 1
    refusal = sum(verdicts[("batched", "full length")]) / len(harmful)
    accuracy = sum(c == q.answer for c, q in zip(choices["batched"], mcqs, strict=True)) / len(mcqs)
    print(
        f"\nidentical verdicts across the four generation variants: {same_verdicts} (refusal rate {refusal:.3f})"
    )
    print(f"identical MCQ choices batched vs one at a time: {same_choices} (acc {accuracy:.3f})")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not (same_verdicts and same_choices):
        sys.exit(1)


if __name__ == "__main__":
    main()
