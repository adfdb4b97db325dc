"""Training the toy models: a tiny Llama, supervised on (user turn, answer) pairs, on the CPU.

Deterministic by construction: the initial weights and the batch order come from the seed alone, and
the loss covers the answer tokens only (the user turn is context, as in chat fine-tuning).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from safesearch.toyworld.data import Pair
from safesearch.toyworld.profiles import ModelShape, Recipe  # noqa: F401  (re-exported: the build's vocabulary)

IGNORE = -100


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.config(tokenizer))


Example = tuple[list[int], int]  # token ids, number of prompt tokens


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], answer_tokens: int | None = None
) -> list[Example]:
    """Each pair as chat-template ids: the prompt up to the assistant marker, then the answer (its first
    ``answer_tokens`` tokens; None: all) and EOS."""
    out = []
    for user, answer in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:answer_tokens] + [tokenizer.eos_token_id]
        out.append((p_ids + a_ids, len(p_ids)))
    return out


def _batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> None:
    """One update: the gradients of ``loss``, clipped to a total norm of 1 over ``params``, applied."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: LlamaForCausalLM,
    examples: Sequence[Example],
    recipe: Recipe,
    seed: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Train ``model`` in place for ``recipe.steps`` steps of batches drawn by a seeded shuffle."""
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    order: list[int] = []
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:  # a fresh epoch, shuffled by the seed
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
        input_ids, labels, mask = _batch([examples[i] for i in idx], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer_step(opt, loss, model.parameters())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
