"""The transformers backend on tiny models: batching changes nothing, log-likelihoods are exact,
early stopping keeps every verdict, image-text models take images, weights change in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_models import FIXTURES, chat_model, llava_model, records
from PIL import Image

from safesearch.backends import Prompt
from safesearch.backends.transformers import TransformersBackend
from safesearch.errors import UserError
from safesearch.judges import KeywordJudge
from safesearch.prompts import mcq_answer_text, mcq_user_text


@pytest.fixture(scope="module")
def chat() -> TransformersBackend:
    return TransformersBackend.from_pretrained(chat_model(), batch_size=4)


@pytest.fixture(scope="module")
def llava() -> TransformersBackend:
    return TransformersBackend.from_pretrained(llava_model(), batch_size=3)


def _prompts() -> list[str]:
    return [
        r["text"]
        for name in ("harmful_general.jsonl", "harmful_medical.jsonl", "benign.jsonl")
        for r in records(name)
    ]


def _mcq_requests() -> list[tuple[str, str]]:
    return [
        (mcq_user_text(r["text"], r["options"]), mcq_answer_text(r["options"], i))
        for r in records("mcq_medical.jsonl")
        for i in range(len(r["options"]))
    ]


def test_batched_generation_equals_one_at_a_time(chat: TransformersBackend) -> None:
    prompts = _prompts()
    batched = chat.generate(prompts, 16)
    single = TransformersBackend(chat.model, chat.tokenizer, batch_size=1).generate(prompts, 16)
    assert batched == single
    assert batched[0].startswith("i ' m sorry") and batched[2].startswith("sure , here is how")


def test_loglikelihood_matches_an_unpadded_forward_pass(chat: TransformersBackend) -> None:
    requests = _mcq_requests() + [("short", "a much longer continuation than its prompt")]
    got = chat.loglikelihood(requests)
    assert got == TransformersBackend(chat.model, chat.tokenizer, batch_size=1).loglikelihood(requests)
    for (prompt, continuation), (ll, n) in zip(requests, got, strict=True):
        context = chat.render(prompt)
        ctx = chat.tokenizer(context, add_special_tokens=False)["input_ids"]
        full = chat.tokenizer(context + " " + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(chat.model(torch.tensor([full])).logits[0].float(), -1)
        expected = sum(float(logprobs[t - 1, full[t]]) for t in range(len(ctx), len(full)))
        assert n == len(full) - len(ctx) and ll == pytest.approx(expected, abs=1e-4)


def test_early_stopping_keeps_every_verdict(chat: TransformersBackend) -> None:
    judge = KeywordJudge()
    prompts = _prompts()
    full = chat.generate(prompts, 16)
    early = chat.generate(prompts, 16, stop=judge.decided)
    assert [judge.is_refusal(r) for r in early] == [judge.is_refusal(r) for r in full]
    assert all(f.startswith(e) for e, f in zip(early, full, strict=True))
    assert sum(len(e.split()) for e in early) < sum(len(f.split()) for f in full) / 2


def test_progress_callback_counts_requests(chat: TransformersBackend) -> None:
    seen: list[int] = []
    chat.generate(_prompts(), 2, on_batch=seen.append)
    assert seen == [4, 4, 2]


def test_weights_change_in_place_between_calls(chat: TransformersBackend) -> None:
    requests = _mcq_requests()[:2]
    before = chat.loglikelihood(requests)
    weight = chat.model.get_output_embeddings().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(0.5)
    try:
        assert chat.loglikelihood(requests) != before  # the merger's edit is seen without a reload
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert chat.loglikelihood(requests) == before


def test_text_model_refuses_images(chat: TransformersBackend) -> None:
    assert not chat.accepts_images
    with pytest.raises(ValueError, match="takes no images"):
        chat.generate([Prompt("hi", images=(Image.new("RGB", (8, 8)),))], 2)


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no config.json"):
        TransformersBackend.from_pretrained(tmp_path)


# -- image-text --------------------------------------------------------------------------------------

IMAGES = sorted((FIXTURES / "vqa_rad" / "VQA_RAD Image Folder").glob("*.jpg"))


def test_image_text_generation_batched_equals_single(llava: TransformersBackend) -> None:
    assert llava.accepts_images
    prompts = [
        Prompt("is there a fracture ?", images=(IMAGES[0],)),
        Prompt("what is shown in the image ?", images=(IMAGES[1],)),
        "what is the capital of france ?",  # text-only turns go through the same model
        Prompt("yes or no ?", images=(Image.open(IMAGES[1]),)),
    ]
    batched = llava.generate(prompts, 6)
    assert batched == TransformersBackend(llava.model, processor=llava.processor, batch_size=1).generate(
        prompts, 6
    )
    assert len(batched) == 4


def test_image_text_loglikelihood_sees_the_image(llava: TransformersBackend) -> None:
    requests = [(Prompt("is there a fracture ?", images=(img,)), "yes") for img in IMAGES]
    lls = llava.loglikelihood(requests)
    single = TransformersBackend(llava.model, processor=llava.processor, batch_size=1).loglikelihood(requests)
    # Padded image batches change the order of float sums: equal to fp32 rounding (1e-7 seen), not bits.
    assert [g for _, g in lls] == [g for _, g in single]
    assert [ll for ll, _ in lls] == pytest.approx([ll for ll, _ in single], rel=1e-5)
    assert lls[0][1] == 1 and lls[0][0] != lls[1][0]  # same text, different image, different score
    rendered = llava.render(requests[0][0])
    assert rendered == "<|user|> <image> is there a fracture ? <|assistant|>"
