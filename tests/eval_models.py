"""Tiny checkpoints for the evaluation tests, built from configs (no download), cached per session.

* :func:`chat_model`: a 2-layer Llama trained for a few seconds on the fixture requests, so that it
  refuses some harmful requests, complies with others, answers the benign ones and learns the fixture
  MCQs: its numbers are neither all 0 nor all 1, which lets the tests tell scorers apart;
* :func:`guard_model`: the same shape trained as a classifier that answers "safe" or "unsafe";
* :func:`llava_model`: a LLaVA with a one-layer CLIP tower (28 px images, 4 image tokens) and a
  processor, random weights: image-text suites run end to end on it.
"""

from __future__ import annotations

import atexit
import json
import tempfile
from functools import cache
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

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


# The toy chat template, taught to put image placeholders before the text of a multimodal user turn.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|user|> "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@cache
def llava_model() -> Path:
    path = Path(_ROOT.name) / "llava"
    tokenizer = build_tokenizer(_corpus())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<image>"]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # 28 x 28 images in 14 px patches: 4 patches and CLIP's class token, which "default" drops.
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


__all__ = ["CHAT_TEMPLATE", "chat_model", "guard_model", "llava_model"]
