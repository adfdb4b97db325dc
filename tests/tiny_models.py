"""Tiny Hugging Face checkpoints built from configs with random weights, for tests (no download).

Every builder writes a complete model directory the way ``save_pretrained`` does (safetensors, config,
generation config) plus a small word-level tokenizer with a chat template, and returns its path:

* :func:`build_tiny_llama`, :func:`build_tiny_qwen2`: text-only causal LMs (``AutoModelForCausalLM``);
* :func:`build_tiny_llava`, :func:`build_tiny_qwen2_vl`, :func:`build_tiny_qwen2_5_vl`: image-text models
  (``AutoModelForImageTextToText``) whose language model has the same shapes as the text builders' (with the
  same ``vocab_size``), so a vector from the text model can be grafted onto their language model. The
  Qwen2.5-VL builder writes a release's whole layout (processor config, Qwen's chat template with vision
  tokens), so that it is also evaluable;
* :func:`build_tiny_llava_hf`: a LLaVA in the llava-hf layout with its processor, evaluable;
* :func:`finetuned_copy`: a copy of a checkpoint with every floating tensor nudged by seeded noise, the
  stand-in for "the same model after fine-tuning" (endpoints of a task vector share their base);
* :func:`load_tiny_model`: the matching transformers model loaded from a directory.

Sizes: hidden 64, 2 layers, head_dim 32 (2 heads, 1 KV head), so that the models also run in vLLM.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
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


# Qwen2.5-VL's chat template as its releases ship it, less the system-prompt and video-id options: image parts
# become <|vision_start|><|image_pad|><|vision_end|>, which the processor widens to one pad per merged patch.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The release's preprocessor_config.json, with the pixel budget cut to 28x28 .. 56x56 (1 to 4 image tokens).
QWEN_VL_PREPROCESSOR = {
    "min_pixels": 784,
    "max_pixels": 3136,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def qwen_vl_tokenizer(corpus: Iterable[str] = _CORPUS) -> transformers.PreTrainedTokenizerFast:
    """The toy word-level tokenizer with Qwen's chat and vision tokens and template (``<|im_end|>`` ends a turn)."""
    tok = build_tokenizer([*corpus, "system you are a helpful assistant . user assistant"])
    tok.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIALS})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_VL_TEMPLATE
    return tok


def tiny_qwen2_5_vl_config(
    vocab_size: int = VOCAB, tokenizer: transformers.PreTrainedTokenizerBase | None = None
) -> transformers.Qwen2_5_VLConfig:
    tok = tokenizer or qwen_vl_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIALS}
    assert max(ids.values()) < vocab_size, "the tokenizer must fit in the vocabulary"
    text = dict(_text_kwargs(vocab_size), rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    text.pop("head_dim")  # hidden / heads = 32
    text["eos_token_id"] = ids["<|im_end|>"]
    # Two blocks, the second with full attention (the real tower windows all but a few): windows of 56 px.
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
    )
    return transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        **dict(_IDS, eos_token_id=ids["<|im_end|>"]),
    )


def model_class(config: transformers.PretrainedConfig) -> type:
    """The Auto class that loads a checkpoint of ``config``."""
    if isinstance(config, transformers.LlavaConfig | transformers.Qwen2VLConfig | transformers.Qwen2_5_VLConfig):
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


# The toy chat template, taught to put image placeholders before the text of a multimodal user turn.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|user|> "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_llava_hf(path: str | Path, seed: int = 0, corpus: Iterable[str] = _CORPUS) -> Path:
    """A random LLaVA in the llava-hf layout with its processor (what LLaVA-Med is converted to): a one-layer
    CLIP tower (28 px images, 4 image tokens), a 2-layer Llama whose vocabulary is ``corpus``'s words."""
    path = Path(path)
    tokenizer = build_tokenizer(corpus)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<image>"]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    # 28 x 28 images in 14 px patches: 4 patches and CLIP's class token, which "default" drops.
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen2_5_vl(
    path: str | Path,
    seed: int = 0,
    vocab_size: int | None = VOCAB,
    dtype: torch.dtype = torch.float32,
    corpus: Iterable[str] = _CORPUS,
) -> Path:
    """A random ``Qwen2_5_VLForConditionalGeneration`` laid out as a release (Lingshu-7B, HuatuoGPT-Vision):
    windowed vision tower with merger, tiny Qwen2 text, tokenizer with vision tokens, ``preprocessor_config.json``
    (``Qwen2_5_VLProcessor``) and ``chat_template.json``. Loads with ``AutoProcessor`` where torchvision is
    installed, and through safesearch's image-only processor where it is not. ``vocab_size`` None: the
    tokenizer's size (every id the model can generate decodes to a word)."""
    path = Path(path)
    tokenizer = qwen_vl_tokenizer(corpus)
    torch.manual_seed(seed)
    config = tiny_qwen2_5_vl_config(vocab_size or len(tokenizer), tokenizer)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN_VL_PREPROCESSOR, indent=2) + "\n")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_TEMPLATE}, indent=2) + "\n")
    return path


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
