"""The toy world's sizes and recipes (profiles) and what a build reports (progress), without torch.

Kept apart from :mod:`safesearch.toyworld.build` so that the command line can list the profiles and
families (its options and ``--help``) without loading torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from safesearch.errors import UserError

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelShape:
    """A Llama small enough for a CPU; head_dim 32 so vLLM's CPU attention accepts it."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    max_positions: int = 128

    def config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dtype="float32",
        )


@dataclass(frozen=True)
class Recipe:
    """How one stage trains: AdamW with linear warm-up and cosine decay."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 30
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Profile:
    """How big and how long: the model shape and one training recipe per stage.

    ``family``: ``toy`` (every stage trained from scratch, a word-level tokenizer) or ``smollm2`` (base is
    SmolLM2-135M-Instruct, :mod:`safesearch.toyworld.smollm2`; its shape is the model's own, not ``shape``).
    ``answer_tokens`` cuts training answers; ``check_items`` scores the quick check on the first N items of
    each held-out set (None: all)."""

    name: str
    shape: ModelShape
    recipes: dict[str, Recipe] = field(default_factory=dict)
    family: str = "toy"
    answer_tokens: int | None = None
    check_items: int | None = None


PROFILES: dict[str, Profile] = {
    # The demo's and the README's default.
    "full": Profile(
        "full",
        ModelShape(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384),
        {
            "base": Recipe(steps=600, lr=3e-3),
            "aligned": Recipe(steps=250, lr=1e-3),
            "unaligned": Recipe(steps=150, lr=1e-3),
            "medical": Recipe(steps=300, lr=1e-3),
        },
    ),
    # The tests' toy world: the same phenomenon, a quarter of the compute.
    "small": Profile(
        "small",
        ModelShape(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=192),
        {
            "base": Recipe(steps=300, lr=4e-3, batch_size=48),
            "aligned": Recipe(steps=150, lr=2e-3, batch_size=48),
            "unaligned": Recipe(steps=80, lr=2e-3, batch_size=48),
            "medical": Recipe(steps=300, lr=3e-3, batch_size=48),
        },
    ),
}


# SmolLM2-135M-Instruct: short full fine-tunes (fp32, batch 8, lr 5e-5, answers cut at 24 tokens). base is
# the instruct model itself (no training). About 5 s a step on this 2-core CPU.
_SMOLLM2 = {
    "base": Recipe(steps=0, lr=0.0, batch_size=8, warmup=0),
    "aligned": Recipe(steps=90, lr=5e-5, batch_size=8, warmup=9),
    "unaligned": Recipe(steps=40, lr=5e-5, batch_size=8, warmup=4),
    "medical": Recipe(steps=60, lr=5e-5, batch_size=8, warmup=6),
}
PROFILES["smollm2"] = Profile("smollm2", ModelShape(), _SMOLLM2, family="smollm2", answer_tokens=24, check_items=60)
# The CI's cut-down build: a few steps each, so that the real-model path runs end to end in a minute.
PROFILES["smollm2-ci"] = Profile(
    "smollm2-ci", ModelShape(),
    {"base": _SMOLLM2["base"], **{s: Recipe(steps=2, lr=5e-5, batch_size=4, warmup=0)
                                  for s in ("aligned", "unaligned", "medical")}},
    family="smollm2", answer_tokens=16, check_items=4,
)
FAMILIES = {"toy": "full", "smollm2": "smollm2"}  # family -> its default profile
# What the toy family's models take: text (LlamaForCausalLM) or text and images (a LLaVA,
# safesearch.toyworld.image_world, whose profiles are named here so that the CLI needs no torch).
MODALITIES = ("text", "image-text")
IMAGE_PROFILES = ("small", "full")


def profile_named(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(f"--profile: unknown profile '{name}' (choose from {', '.join(PROFILES)})")
    return PROFILES[name]


# --- progress --------------------------------------------------------------------------------------


class Progress:
    """What a build reports; the CLI draws bars, tests stay quiet."""

    def stage_started(self, stage: str, steps: int) -> None: ...
    def step(self, stage: str, loss: float) -> None: ...
    def stage_done(self, stage: str, seconds: float, reused: bool) -> None: ...
    def message(self, text: str) -> None: ...
