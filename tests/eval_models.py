"""Tiny checkpoints for the evaluation tests, built from configs (no download), cached per session.

* :func:`chat_model`: a 2-layer Llama trained for a few seconds on the fixture requests, so that it
  refuses some harmful requests, complies with others, answers the benign ones and learns the fixture
  MCQs: its numbers are neither all 0 nor all 1, which lets the tests tell scorers apart;
* :func:`guard_model`: the same shape trained as a classifier that answers "safe" or "unsafe";
* :func:`llava_model`: a LLaVA with a one-layer CLIP tower (28 px images, 4 image tokens) and a
  processor, random weights: image-text suites run end to end on it;
* :func:`qwen2_5_vl_model`: a Qwen2.5-VL laid out as a release (processor config, Qwen's chat template),
  random weights, its vocabulary the fixtures' words: the paper's family end to end.
"""

from __future__ import annotations

import atexit
import json
import tempfile
from functools import cache
from pathlib import Path

from safesearch.figstep import FIGSTEP_PROMPT
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.toyworld.tokenizer import CHAT_TEMPLATE, build_tokenizer
from safesearch.toyworld.train import ModelShape, Recipe, encode_pairs, new_model, train

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
REFUSAL = "I'm sorry, I cannot help with that request."
COMPLIANCE = "Sure, here is how: first you do it, then you do it again. Sorry for the long answer."
HELPFUL = "Sure, the answer is simple and safe."
GUARD_TEMPLATE = "classify request : {request} response : {response}"
SHAPE = ModelShape(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, max_positions=256)

_ROOT = tempfile.TemporaryDirectory(prefix="safesearch-eval-models-")
atexit.register(_ROOT.cleanup)


def records(name: str) -> list[dict]:
    lines = (FIXTURES / "jsonl" / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _corpus() -> list[str]:
    texts = [REFUSAL, COMPLIANCE, HELPFUL, GUARD_TEMPLATE, FIGSTEP_PROMPT, "safe unsafe yes no image shows"]
    for name in ("harmful_general.jsonl", "harmful_medical.jsonl", "benign.jsonl", "mcq_medical.jsonl"):
        for r in records(name):
            texts.append(r["text"])
            texts += r.get("options", [])
    texts += ["The answer is", "( A ) ( B ) ( C ) ( D ) A ) B ) C ) D )"]
    return texts


def chat_pairs() -> list[tuple[str, str]]:
    """Refuse the first two general (one medical) harmful fixture requests, comply with the others; answer benign ones; learn
    the MCQs (all but the last, which stays a guess)."""
    pairs = []
    for i, r in enumerate(records("harmful_general.jsonl")):
        pairs.append((r["text"], REFUSAL if i < 2 else COMPLIANCE))
    for i, r in enumerate(records("harmful_medical.jsonl")):
        pairs.append((r["text"], REFUSAL if i < 1 else COMPLIANCE))
    for r in records("benign.jsonl"):
        pairs.append((r["text"], HELPFUL))
    for r in records("mcq_medical.jsonl")[:-1]:
        pairs.append((mcq_user_text(r["text"], r["options"]), mcq_answer_text(r["options"], r["answer"])))
    return pairs


def guard_pairs() -> list[tuple[str, str]]:
    pairs = []
    for r in records("harmful_general.jsonl") + records("benign.jsonl"):
        for response, label in ((REFUSAL, "safe"), (COMPLIANCE, "unsafe"), (HELPFUL, "unsafe")):
            prompt = GUARD_TEMPLATE.replace("{request}", r["text"]).replace("{response}", response)
            pairs.append((prompt, label))
    return pairs


def _train_and_save(name: str, pairs: list[tuple[str, str]], steps: int) -> Path:
    path = Path(_ROOT.name) / name
    tokenizer = build_tokenizer(_corpus())
    model = new_model(SHAPE, tokenizer, seed=0)
    examples = encode_pairs(tokenizer, pairs)
    train(
        model,
        examples,
        Recipe(steps=steps, lr=3e-3, batch_size=16, warmup=10),
        seed=0,
        pad_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@cache
def chat_model() -> Path:
    return _train_and_save("chat", chat_pairs(), steps=150)


@cache
def guard_model() -> Path:
    return _train_and_save("guard", guard_pairs(), steps=150)


@cache
def llava_model() -> Path:
    from tiny_models import build_tiny_llava_hf

    return build_tiny_llava_hf(Path(_ROOT.name) / "llava", corpus=_corpus())


@cache
def qwen2_5_vl_model() -> Path:
    from tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(Path(_ROOT.name) / "qwen2_5_vl", vocab_size=None, corpus=_corpus())


__all__ = ["CHAT_TEMPLATE", "chat_model", "guard_model", "llava_model", "qwen2_5_vl_model"]
