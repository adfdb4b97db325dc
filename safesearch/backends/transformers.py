"""The transformers backend: batched greedy generation and option log-likelihoods, text or image-text.

Both calls sort requests longest first (similar lengths share a batch and waste little on padding) and
left-pad, so that every row ends at the last column: generation appends there, and log-likelihood only
needs the logits of the last few positions (``logits_to_keep``), not a [batch, length, vocabulary] block.
A text model gets explicit position ids, so that padding does not shift its positions; an image-text model
computes its own (Qwen2-VL's multimodal positions come from the attention mask).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from safesearch.backends.base import OnBatch, PromptLike, StopRule, as_prompt
from safesearch.backends.models import check_native, read_model_config, takes_images
from safesearch.backends.processors import load_processor
from safesearch.errors import UserError


@dataclass
class _Encoded:
    """A rendered prompt as token ids, plus the model inputs its images became: per image (pixel values,
    grid sizes) and per token (Qwen2-VL's ``mm_token_type_ids``: which tokens are image placeholders)."""

    text: str
    ids: list[int]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # 1-D, one value per id

    def extended(self, continuation: list[int]) -> _Encoded:
        """The prompt followed by ``continuation`` (text tokens: per-token inputs 0 there, as the
        processor gives text tokens)."""
        pad = len(continuation)
        per_token = {k: torch.cat([v, v.new_zeros(pad)]) for k, v in self.per_token.items()}
        return _Encoded(self.text, self.ids + continuation, self.images, per_token)


def _load_image(img: Image.Image | Path) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    path = Path(img)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist")
    with Image.open(path) as im:
        return im.convert("RGB")


def render_prompt(prompt: PromptLike, tokenizer: Any, processor: Any | None) -> str:
    """``prompt`` through the chat template of ``processor`` (image-text models) or ``tokenizer``."""
    p = as_prompt(prompt)
    if p.messages:
        messages: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in p.messages]
    elif processor is not None:  # image-text chat templates take a list of typed parts
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in p.images]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": p.text}]}]
    else:
        messages = [{"role": "user", "content": p.text}]
    templater = processor if processor is not None else tokenizer
    if getattr(templater, "chat_template", None) is None:
        if p.messages:
            raise ValueError("a conversation prompt needs a model with a chat template")
        return p.text
    return templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_chat_template(path: Path, tokenizer: Any, processor: Any | None) -> None:
    """A chat template that does not render is named before the model loads, not at the first prompt."""
    import jinja2

    try:
        render_prompt("hello", tokenizer, processor)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template of the model at '{path}' does not render: {e}") from None


class _StopWhenDecided(StoppingCriteria):
    """Per-row early stopping: a row is done once ``stop`` says its response so far settles the verdict."""

    def __init__(
        self, decode: Callable[[torch.Tensor], str], prompt_width: int, stop: StopRule, rows: int
    ) -> None:
        self.decode, self.width, self.stop = decode, prompt_width, stop
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        for row in range(input_ids.shape[0]):
            if not self.done[row] and self.stop(self.decode(input_ids[row, self.width :])):
                self.done[row] = True
        return self.done.to(input_ids.device).clone()


class TransformersBackend:
    """Owns a transformers model (causal LM or image-text) and its tokenizer / processor.

    The merger edits ``model``'s weights in place; the next call sees them.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        processor: Any | None = None,
        batch_size: int = 64,
    ) -> None:
        if tokenizer is None:
            if processor is None:
                raise ValueError("TransformersBackend needs a tokenizer or a processor")
            tokenizer = processor.tokenizer
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        # Multimodal models compute their own positions (Qwen2-VL's 3-D rope); text models get ours.
        self._own_positions = processor is None and "position_ids" in params

    @staticmethod
    def takes_images(path: str | Path) -> bool:
        """Whether the checkpoint at ``path`` is an image-text model, read from config.json alone, so that a
        suite needing images fails before a long load (see :mod:`safesearch.backends.models`)."""
        return takes_images(path)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, batch_size: int = 64
    ) -> TransformersBackend:
        """Load a checkpoint directory: an image-text model (its config has a vision part) with its
        processor (without torchvision: no video processor, see :mod:`safesearch.backends.processors`),
        else a causal LM with its tokenizer."""
        path = Path(path)
        config = read_model_config(path)
        check_native(path, config)
        try:
            if "vision_config" in config:
                processor = load_processor(path, config.get("model_type"))
                _check_chat_template(path, processor.tokenizer, processor)
                model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto")
                return cls(model.to(device), processor=processor, batch_size=batch_size)
            tokenizer = AutoTokenizer.from_pretrained(path)
            _check_chat_template(path, tokenizer, None)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        except (OSError, ValueError, KeyError, ImportError) as e:
            # ImportError: a processor part that needs a package this install lacks (named in the message).
            raise UserError(f"could not load the model at '{path}': {str(e).strip().splitlines()[0]}") from None
        return cls(model.to(device), tokenizer, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def accepts_images(self) -> bool:
        return self.processor is not None and getattr(self.processor, "image_processor", None) is not None

    # -- rendering and encoding ---------------------------------------------------------------------

    def render(self, prompt: PromptLike) -> str:
        """The prompt as the model sees it, up to the start of the assistant's answer."""
        p = as_prompt(prompt)
        if p.images and not self.accepts_images:
            raise ValueError("this model takes no images")
        return render_prompt(p, self.tokenizer, self.processor)

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, prompt: PromptLike) -> _Encoded:
        p = as_prompt(prompt)
        text = self.render(p)
        if not p.images:
            return _Encoded(text, self._token_ids(text))
        enc = self.processor(
            text=[text],
            images=[_load_image(i) for i in p.images],
            return_tensors="pt",
            add_special_tokens=False,
        )
        ids = enc["input_ids"][0].tolist()
        images: dict[str, torch.Tensor] = {}
        per_token: dict[str, torch.Tensor] = {}
        for k, v in enc.items():
            if k in ("input_ids", "attention_mask"):
                continue
            if v.dim() == 2 and v.shape == (1, len(ids)) and not v.is_floating_point():
                per_token[k] = v[0]
            else:
                images[k] = v
        return _Encoded(text, ids, images, per_token)

    def _batch(self, rows: list[_Encoded]) -> tuple[dict[str, torch.Tensor], int]:
        """Left-padded model inputs for ``rows``: ids, mask, per-token inputs padded like the ids (0), and
        per-image inputs stacked along the first axis in row order; returns the width."""
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids) :] = 1
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        if self._own_positions:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        for key in sorted({k for r in rows for k in r.per_token}):
            dtype = next(r.per_token[key].dtype for r in rows if key in r.per_token)
            padded = torch.zeros((len(rows), width), dtype=dtype)
            for i, r in enumerate(rows):
                if key in r.per_token:  # a text-only row of a mixed batch: all zeros, as for text tokens
                    padded[i, width - len(r.ids) :] = r.per_token[key]
            inputs[key] = padded
        for key in sorted({k for r in rows for k in r.images}):
            inputs[key] = torch.cat([r.images[key] for r in rows if key in r.images], dim=0)
        return {k: v.to(self.device) for k, v in inputs.items()}, width

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (
            getattr(self.model.generation_config, "eos_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return sorted(ids)

    # -- the two requests -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[PromptLike],
        max_new_tokens: int,
        *,
        stop: StopRule | None = None,
        on_batch: OnBatch | None = None,
    ) -> list[str]:
        encoded = [self._encode(p) for p in prompts]
        # Longest first; ties keep their order (sorted is stable), so batches are a function of the input.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))
        out: list[str] = [""] * len(encoded)

        def decode(ids: torch.Tensor) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs, width = self._batch([encoded[i] for i in idx])
            criteria = None
            if stop is not None:
                criteria = StoppingCriteriaList([_StopWhenDecided(decode, width, stop, len(idx))])
            gen = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self._eos_ids(),
                stopping_criteria=criteria,
            )
            for row, i in enumerate(idx):
                out[i] = decode(gen[row, width:])
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def _continuation_ids(self, context: str, continuation: str) -> list[int]:
        """The continuation's tokens as they follow the context (one space between, unless the rendered
        context already ends in whitespace); encoded apart if a merge crosses the boundary."""
        sep = "" if not context or context[-1].isspace() else " "
        ctx_ids = self._token_ids(context)
        full_ids = self._token_ids(context + sep + continuation)
        if full_ids[: len(ctx_ids)] == ctx_ids:
            return full_ids[len(ctx_ids) :]
        return self._token_ids(continuation)

    @torch.inference_mode()
    def loglikelihood(
        self, requests: Sequence[tuple[PromptLike, str]], *, on_batch: OnBatch | None = None
    ) -> list[tuple[float, int]]:
        contexts: dict[PromptLike, _Encoded] = {}  # the options of one question share their context
        rows: list[tuple[_Encoded, list[int]]] = []
        for prompt, continuation in requests:
            key = prompt if isinstance(prompt, str) or not prompt.images else id(prompt)
            if key not in contexts:
                contexts[key] = self._encode(prompt)
            ctx = contexts[key]
            rows.append((ctx, self._continuation_ids(ctx.text, continuation)))
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0].ids) + len(rows[i][1])))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            keep = max(len(rows[i][1]) for i in idx) + 1  # continuation token t is predicted at t - 1
            inputs, _ = self._batch([rows[i][0].extended(rows[i][1]) for i in idx])
            if self._keeps_logits:
                logits = self.model(**inputs, logits_to_keep=keep).logits
            else:
                logits = self.model(**inputs).logits[:, -keep:]
            logprobs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
            for row, i in enumerate(idx):
                cont = rows[i][1]
                if not cont:
                    continue
                targets = torch.tensor(cont, device=logprobs.device)
                picked = (
                    logprobs[row, keep - 1 - len(cont) : keep - 1].gather(-1, targets[:, None]).squeeze(-1)
                )
                out[i] = (float(picked.sum()), len(cont))
            if on_batch is not None:
                on_batch(len(idx))
        return out
