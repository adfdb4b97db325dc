"""MCQ log-likelihood with each question's shared prefix computed once (one packed pass per question)
against the per-option path it replaced: the same token counts, log-likelihoods equal to fp32 rounding,
and identical outcomes (acc and acc_norm choices) and metrics on the toy world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_models import chat_model, llava_model, qwen2_5_vl_model, records
from PIL import Image
from transformers import AutoModelForCausalLM

from safesearch.backends import Prompt
from safesearch.backends.transformers import TransformersBackend, _pack, _row_sums, _split_options
from safesearch.evaluate import evaluate, load_items
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.suites import parse_suite


class PerOption(TransformersBackend):
    """The per-option path behind the ``loglikelihood`` call, as before the shared prefix."""

    loglikelihood = TransformersBackend._loglikelihood_per_option


def _same_scores(got: list[tuple[float, int]], ref: list[tuple[float, int]], rel: float = 1e-5) -> None:
    assert [n for _, n in got] == [n for _, n in ref]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], rel=rel, abs=1e-5)


@pytest.mark.parametrize("split", ["search", "holdout"])
def test_toy_world_outcomes_and_metrics_are_identical(
    toyworld_small: Path, split: str, tmp_path: Path
) -> None:
    shared = TransformersBackend.from_pretrained(toyworld_small / "medical", batch_size=64)
    per_option = PerOption(shared.model, shared.tokenizer, batch_size=64)
    path = toyworld_small / "data" / split / "mcq_medical.jsonl"
    suite = parse_suite(
        {
            "name": "mcq",
            "metric": "mcq_loglik",
            "dataset": {"format": "jsonl", "path": str(path), "split": ""},
        },
        source=tmp_path / "mcq.yaml",
    )
    items = load_items(suite, tmp_path)
    assert len(items) >= 100
    got, ref = evaluate(shared, suite, items), evaluate(per_option, suite, items)
    assert got.items == ref.items  # choice, choice_norm, correct: what a trial stores
    assert got.metrics == ref.metrics
    requests = [
        (mcq_user_text(it.text, it.options), mcq_answer_text(it.options, i))
        for it in items
        for i in range(len(it.options or ()))
    ]
    _same_scores(shared.loglikelihood(requests), per_option.loglikelihood(requests))


@pytest.fixture(scope="module")
def chat() -> TransformersBackend:
    return TransformersBackend.from_pretrained(chat_model(), batch_size=5)


def _edge_requests() -> list[tuple[str, str]]:
    mcq = [
        (mcq_user_text(r["text"], r["options"]), mcq_answer_text(r["options"], i))
        for r in records("mcq_medical.jsonl")
        for i in range(len(r["options"]))
    ]
    return [
        *mcq[:4],
        ("is it ?", "yes"),  # an option that is the start of another
        ("short", "a much longer continuation than its prompt"),  # a context with a single option
        ("is it ?", "yes it is"),  # the same context again, not next to its first options
        ("is it ?", ""),  # an empty continuation: (0.0, 0)
        ("is it ?", "no"),
        *mcq[4:],
        mcq[0],  # a request twice
    ]


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_edge_cases_match_the_per_option_path(chat: TransformersBackend, batch_size: int) -> None:
    requests = _edge_requests()
    backend = TransformersBackend(chat.model, chat.tokenizer, batch_size=batch_size)
    seen: list[int] = []
    got = backend.loglikelihood(requests, on_batch=seen.append)
    _same_scores(got, PerOption(chat.model, chat.tokenizer, batch_size=4).loglikelihood(requests))
    assert sum(seen) == len(requests)
    # The same request twice: the same score, up to float rounding of its row's batch (1e-7 seen on CI).
    assert got[7] == (0.0, 0) and got[-1][1] == got[0][1] and got[-1][0] == pytest.approx(got[0][0], abs=1e-5)


def test_eager_attention_takes_an_additive_mask(chat: TransformersBackend) -> None:
    model = AutoModelForCausalLM.from_pretrained(chat_model(), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    backend = TransformersBackend(model, chat.tokenizer, batch_size=8)
    requests = _edge_requests()
    _same_scores(backend.loglikelihood(requests), PerOption(model, chat.tokenizer).loglikelihood(requests))
    _same_scores(backend.loglikelihood(requests), chat.loglikelihood(requests), rel=1e-4)


def test_a_row_longer_than_the_sliding_window_is_scored_per_option(chat: TransformersBackend) -> None:
    """The packed mask does not apply a sliding window: a question whose packed row would not fit in it
    goes through the per-option path (here every one: a window of 4 tokens)."""
    model = AutoModelForCausalLM.from_pretrained(chat_model())
    model.config.sliding_window = 4  # a fresh model: the attribute is read, not applied by Llama
    requests = _edge_requests()
    got = TransformersBackend(model, chat.tokenizer, batch_size=4).loglikelihood(requests)
    assert got == PerOption(model, chat.tokenizer, batch_size=4).loglikelihood(requests)  # the same path


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_image_text_models_text_and_image_options(family: str) -> None:
    """Text-only questions share their prefix on image-text models too; image questions keep the
    per-option path; a mixed call gives each request what the per-option path gives it."""
    path = {"llava": llava_model, "qwen2_5_vl": qwen2_5_vl_model}[family]()
    backend = TransformersBackend.from_pretrained(path, batch_size=6)
    image = Prompt("is there a fracture ?", images=(Image.new("RGB", (56, 56), (200, 30, 30)),))
    requests = [(image, "yes"), *_edge_requests()[:6], (image, "no")]
    ref = PerOption(backend.model, processor=backend.processor, batch_size=6).loglikelihood(requests)
    _same_scores(backend.loglikelihood(requests), ref)


def test_row_sums_add_as_a_one_dimensional_sum() -> None:
    torch.manual_seed(0)
    values = torch.randn(400) * 3 - 8
    places = [list(range(i, i + n)) for i, n in zip(range(0, 380, 7), [1, 3, 8, 9, 17] * 11, strict=False)]
    got = _row_sums(values, places)
    assert got == [(float(values[p].sum()), len(p)) for p in places]


def test_split_options_stops_one_token_short_of_the_shortest_option() -> None:
    q = _split_options([1, 2], [[5, 6, 7], [5, 6, 8], [5, 9]])
    assert (q.prefix, q.first, q.suffixes) == ([1, 2, 5], 2, [[6, 7], [6, 8], [9]])
    q = _split_options([1, 2], [[5, 6], [5, 6]])
    assert (q.prefix, q.suffixes) == ([1, 2, 5], [[6], [6]])
    q = _split_options([1, 2], [[5], [5, 6]])
    assert (q.prefix, q.suffixes) == ([1, 2], [[5], [5, 6]])


def test_pack_fills_batches_in_order() -> None:
    assert _pack([4, 4, 4, 70, 4], 8) == [[0, 1], [2], [3], [4]]
    assert _pack([], 8) == []
