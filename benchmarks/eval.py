"""Evaluation throughput, side by side in one run on the toy medical model (run by hand, not a test).

    .venv/bin/python benchmarks/eval.py [--world storage/toyworld] [--max-new-tokens 32] [--repeats 3]

Measures items per second for
- generation-judged safety (held-out harmful general + medical, keyword judge): batched against one
  item at a time, each with early stopping (stop once the judge can decide) and at full length;
- log-likelihood MCQ (held-out medical MCQ): each question's shared prefix computed once (one packed
  row per question, ``TransformersBackend.loglikelihood``) against every option a row of its own (the
  path before, ``_loglikelihood_per_option``), end to end and the forward passes alone (tokenized
  beforehand); the shared prefix also one question at a time;
and checks that every variant gives the same per-item verdicts / choices (acc and acc_norm), and counts
how many option log-likelihoods are bit-equal to the per-option path's (and, for scale, how many of
the per-option path's own are bit-equal between its batch size and one row at a time). The arms of a
task alternate within each of ``--repeats`` rounds and each figure is the best round (the machine is
shared; the best round is the least disturbed one). The load average is printed beside the figures.

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
from typing import Any

import torch

from safesearch.backends.transformers import TransformersBackend, _pack, _split_options
from safesearch.datasets import read_dataset
from safesearch.judges import KeywordJudge
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.scorers import pick_options


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


def alternate(repeats: int, arms: dict[str, Callable[[], Any]]) -> dict[str, tuple[float, float, Any]]:
    """Per arm: (best wall seconds, best CPU seconds of this process over ``repeats`` rounds, its result);
    each round runs every arm once, in turn, so that a disturbance of the shared machine hits the arms
    alike. CPU time leaves out the time other processes hold the cores (the machine is shared)."""
    best = {label: (float("inf"), float("inf"), None) for label in arms}
    for _ in range(repeats):
        for label, fn in arms.items():
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[label] = (min(best[label][0], wall), min(best[label][1], cpu), result)
    return best


def mcq_choices(scores: list[tuple[float, int]], mcqs: list[Any]) -> list[tuple[int, int]]:
    """(acc choice, acc_norm choice) per question, as the evaluation makes them."""
    it = iter(scores)
    return [
        pick_options(
            [next(it)[0] for _ in q.options], [mcq_answer_text(q.options, i) for i in range(len(q.options))]
        )
        for q in mcqs
    ]


def passes_only(
    backend: TransformersBackend, requests: list[tuple[str, str]]
) -> dict[str, Callable[[], Any]]:
    """The forward passes of both paths on requests tokenized beforehand (what a real model's time is)."""
    contexts, keys, conts = backend._encode_requests(requests)
    rows = [(contexts[k], c) for k, c in zip(keys, conts, strict=True)]
    by_context: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        by_context.setdefault(k, []).append(i)
    plans = [_split_options(contexts[k].ids, [conts[i] for i in idx]) for k, idx in by_context.items()]
    plans.sort(key=lambda q: -(len(q.prefix) + sum(len(s) - 1 for s in q.suffixes)))

    @torch.inference_mode()
    def per_option() -> object:
        return backend._score_rows(rows, None)

    @torch.inference_mode()
    def shared() -> object:
        return [
            backend._score_questions([plans[b] for b in batch])
            for batch in _pack([len(q.suffixes) for q in plans], backend.batch_size)
        ]

    return {"passes only: per option (before)": per_option, "passes only: shared prefix": shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("storage/toyworld"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--mcq-only", action="store_true", help="skip the generation (safety) measurements")
    parser.add_argument("--stand-in-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
        f"safety: {len(harmful)} harmful prompts, max_new_tokens={args.max_new_tokens}; MCQ: {len(mcqs)} questions, {len(requests)} options "
        f"({'/'.join(str(n) for n in sorted({len(q.options) for q in mcqs}))} per question)\n"
    )

    rows = []
    verdicts = {}
    gen_arms = {
        (label, stop_label): (
            lambda backend=backend, stop=stop: backend.generate(harmful, args.max_new_tokens, stop=stop)
        )
        for label, backend in (("batched", batched), ("one at a time", single))
        for stop_label, stop in (("early stop", judge.decided), ("full length", None))
    }
    for (label, stop_label), (seconds, _, responses) in alternate(
        0 if args.mcq_only else args.repeats, gen_arms
    ).items():
        if responses is None:
            continue
        verdicts[(label, stop_label)] = [judge.is_refusal(r) for r in responses]
        tokens = sum(len(batched.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
        rows.append(
            (
                "safety (generate + keyword judge)",
                f"{label}, {stop_label}",
                len(harmful) / seconds,
                seconds,
                f"{tokens / len(harmful):.1f} tokens/response",
            )
        )

    one_question = TransformersBackend(
        batched.model, batched.tokenizer, batch_size=max(len(q.options) for q in mcqs)
    )
    mcq_arms: dict[str, Callable[[], Any]] = {
        "per option (before)": lambda: batched._loglikelihood_per_option(requests),
        "shared prefix": lambda: batched.loglikelihood(requests),
        "shared prefix, 1 question/pass": lambda: one_question.loglikelihood(requests),
        **passes_only(batched, requests),
    }
    mcq = alternate(args.repeats, mcq_arms)
    for label, (seconds, cpu, _) in mcq.items():
        base = mcq[
            "passes only: per option (before)" if label.startswith("passes") else "per option (before)"
        ]
        rows.append(
            (
                "MCQ (log-likelihood)",
                label,
                len(mcqs) / seconds,
                seconds,
                f"{base[0] / seconds:.2f}x (CPU time {cpu:.3f} s: {base[1] / cpu:.2f}x)",
            )
        )

    print(f"{'task':36} {'variant':34} {'items/s':>9} {'seconds':>8}  vs before / tokens")
    for task, variant, rate, seconds, extra in rows:
        print(f"{task:36} {variant:34} {rate:9.1f} {seconds:8.3f}  {extra}")
    same_verdicts = len({tuple(v) for v in verdicts.values()}) <= 1
    if verdicts:
        refusal = sum(verdicts[("batched", "full length")]) / len(harmful)
        print(
            f"\nidentical verdicts across the four generation variants: {same_verdicts} "
            f"(refusal rate {refusal:.3f})"
        )
    before = mcq["per option (before)"][2]
    one_row = TransformersBackend(batched.model, batched.tokenizer, batch_size=1)._loglikelihood_per_option(
        requests
    )
    choices = {
        label: mcq_choices(mcq[label][2], mcqs)
        for label in ("per option (before)", "shared prefix", "shared prefix, 1 question/pass")
    }
    choices["per option, 1 row/pass"] = mcq_choices(one_row, mcqs)
    same_choices = len({tuple(c) for c in choices.values()}) == 1
    acc = sum(c == q.answer for (c, _), q in zip(choices["shared prefix"], mcqs, strict=True)) / len(mcqs)
    acc_norm = sum(c == q.answer for (_, c), q in zip(choices["shared prefix"], mcqs, strict=True)) / len(
        mcqs
    )
    print(
        f"identical MCQ choices (acc and acc_norm) across the four MCQ variants: {same_choices} "
        f"(acc {acc:.3f}, acc_norm {acc_norm:.3f})"
    )
    for label in ("shared prefix", "shared prefix, 1 question/pass"):
        got = mcq[label][2]
        equal = sum(g == b for g, b in zip(got, before, strict=True))
        counts = [n for _, n in got] == [n for _, n in before]
        diff = max(abs(g[0] - b[0]) for g, b in zip(got, before, strict=True))
        print(
            f"{label}: log-likelihoods bit-equal to the per-option path: {equal}/{len(before)} "
            f"(max |difference| {diff:.1e}); token counts identical: {counts}"
        )
    equal = sum(g == b for g, b in zip(one_row, before, strict=True))
    print(
        f"for scale, the per-option path at batch size 1 vs {args.batch_size}: bit-equal {equal}/{len(before)}"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not (same_verdicts and same_choices):
        sys.exit(1)


if __name__ == "__main__":
    main()
