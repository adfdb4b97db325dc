"""Tiny Hugging Face checkpoints built from configs with random weights, for tests (no download).

Every builder writes a complete model directory the way ``save_pretrained`` does (safetensors, config,
generation config) plus a small word-level tokenizer with a chat template, and returns its path:

* :func:`build_tiny_llama`, :func:`build_tiny_qwen2`: text-only causal LMs (``AutoModelForCausalLM``);
* :func:`build_tiny_llava`, :func:`build_tiny_qwen2_vl`: image-text models (``AutoModelForImageTextToText``)
  whose language model has the same shapes as the text builders' (with the same ``vocab_size``), so a
  vector from the text model can be grafted onto their language model;
* :func:`finetuned_copy`: a copy of a checkpoint with every floating tensor nudged by seeded noise, the
  stand-in for "the same model after fine-tuning" (endpoints of a task vector share their base);
* :func:`load_tiny_model`: the matching transformers model loaded from a directory.

Sizes: hidden 64, 2 layers, head_dim 32 (2 heads, 1 KV head), so that the models also run in vLLM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from safesearch.toyworld.tokenizer import build_tokenizer

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 2, 1, 32
VOCAB = 96
_CORPUS = ["what is the dose of the drug for a child ?", "the answer is ( a ) .", "refuse harmful requests ."]
# Special ids of the tokenizer (see safesearch.toyworld.tokenizer): <pad>=0, <s>=2, </s>=3.
_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def _text_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **_IDS,
    )


def tiny_llama_config(vocab_size: int = VOCAB) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**_text_kwargs(vocab_size))


def tiny_qwen2_config(vocab_size: int = VOCAB) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**_text_kwargs(vocab_size))


def tiny_llava_config(vocab_size: int = VOCAB) -> transformers.LlavaConfig:
    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, image_size=28, patch_size=14,
    )
    return transformers.LlavaConfig(
        text_config=tiny_llama_config(vocab_size).to_dict(), vision_config=vision,
        image_token_id=vocab_size - 1, tie_word_embeddings=False, **_IDS,
    )


def tiny_qwen2_vl_config(vocab_size: int = VOCAB) -> transformers.Qwen2VLConfig:
    text = dict(_text_kwargs(vocab_size), rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    text.pop("head_dim")  # Qwen2-VL derives it: hidden / heads = 32
    vision = dict(
        depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2,
    )
    return transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 4, tie_word_embeddings=False, **_IDS,
    )


def model_class(config: transformers.PretrainedConfig) -> type:
    """The Auto class that loads a checkpoint of ``config``."""
    if isinstance(config, transformers.LlavaConfig | transformers.Qwen2VLConfig):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def save_tiny_model(
    config: transformers.PretrainedConfig, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Instantiate ``config`` with weights drawn from ``seed`` and save it with a tokenizer to ``path``."""
    path = Path(path)
    torch.manual_seed(seed)
    model = model_class(config).from_config(config, dtype=dtype)
    with torch.no_grad():  # init is tiny-scale; make every tensor (norms too) random so that merges move them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    build_tokenizer(_CORPUS).save_pretrained(path)
    return path


def build_tiny_llama(path: str | Path, seed: int = 0, vocab_size: int = VOCAB, dtype: torch.dtype = torch.float32) -> Path:
    """A random ``LlamaForCausalLM`` checkpoint at ``path``."""
    return save_tiny_model(tiny_llama_config(vocab_size), path, seed, dtype)


def build_tiny_qwen2(path: str | Path, seed: int = 0, vocab_size: int = VOCAB, dtype: torch.dtype = torch.float32) -> Path:
    """A random ``Qwen2ForCausalLM`` checkpoint at ``path`` (q/k/v biases, unlike Llama)."""
    return save_tiny_model(tiny_qwen2_config(vocab_size), path, seed, dtype)


def build_tiny_llava(path: str | Path, seed: int = 0, vocab_size: int = VOCAB, dtype: torch.dtype = torch.float32) -> Path:
    """A random ``LlavaForConditionalGeneration`` checkpoint (CLIP tower, projector, tiny Llama)."""
    return save_tiny_model(tiny_llava_config(vocab_size), path, seed, dtype)


def build_tiny_qwen2_vl(path: str | Path, seed: int = 0, vocab_size: int = VOCAB, dtype: torch.dtype = torch.float32) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` checkpoint (vision tower with merger, tiny Qwen2 text)."""
    return save_tiny_model(tiny_qwen2_vl_config(vocab_size), path, seed, dtype)


def finetuned_copy(src: str | Path, dst: str | Path, seed: int, scale: float = 0.01) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with seeded noise of std ``scale`` added to every floating tensor."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for k, t in tensors.items():
            if t.is_floating_point():
                tensors[k] = (t.float() + torch.randn(t.shape, generator=gen) * scale).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def load_tiny_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model saved at ``path``, in eval mode on the CPU."""
    config = transformers.AutoConfig.from_pretrained(path)
    return model_class(config).from_pretrained(path, dtype=dtype).eval()


def build_graft_family(root: str | Path, builder=build_tiny_llama, seed: int = 0) -> dict[str, Path]:
    """The toy world's shape in miniature: ``unaligned`` (a base), ``aligned`` and ``medical`` fine-tunes.

    ``aligned`` = base + noise, ``medical`` = aligned + noise, all from ``builder``; returns name -> path.
    """
    root = Path(root)
    unaligned = builder(root / "unaligned", seed=seed)
    aligned = finetuned_copy(unaligned, root / "aligned", seed=seed + 1)
    medical = finetuned_copy(aligned, root / "medical", seed=seed + 2)
    return {"unaligned": unaligned, "aligned": aligned, "medical": medical}


def graft_spec_dict(paths: dict[str, Path], groups: dict | None = None, **vector_options) -> dict:
    """The toy-world graft spec (anchor medical; safety = aligned - unaligned; medical = medical - aligned)."""
    return {
        "anchor": "medical",
        "checkpoints": {name: str(p) for name, p in paths.items()},
        "vectors": {
            "safety": {"diff": "aligned - unaligned", **vector_options},
            "medical": {"diff": "medical - aligned"},
        },
        "groups": groups or {"preset": "layer"},
    }
