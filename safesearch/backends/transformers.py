"""The transformers backend: batched greedy generation and option log-likelihoods, text or image-text.

Both calls sort requests longest first (similar lengths share a batch and waste little on padding) and
left-pad, so that every row ends at the last column: generation appends there, and log-likelihood only
needs the logits of the last few positions (``logits_to_keep``), not a [batch, length, vocabulary] block.
A text model gets explicit position ids, so that padding does not shift its positions; an image-text model
computes its own (Qwen2-VL's multimodal positions come from the attention mask). Log-likelihood packs
the options of a text question into one row, their shared prefix computed once (see
:meth:`TransformersBackend.loglikelihood`).
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
        # The packed log-likelihood gives each option's tokens explicit positions (after the prefix's).
        self._takes_positions = "position_ids" in params

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
        ctx_ids = self._token_ids(context)
        full_ids = self._token_ids(context + _separator(context) + continuation)
        if full_ids[: len(ctx_ids)] == ctx_ids:
            return full_ids[len(ctx_ids) :]
        return self._token_ids(continuation)

    # -- log-likelihood ---------------------------------------------------------------------------
    #
    # The options of a multiple-choice question share their context and often the start of their answers
    # ("The answer is ..."). Scoring each option as a row of its own recomputes that prefix once per
    # option: most of a trial's evaluation. Here a question is one row instead: the shared prefix once,
    # then every option's own tokens side by side, an attention mask keeping the options apart and
    # positions continuing the prefix's for each (tree attention). Causal attention makes it the same
    # computation: a token's hidden state depends only on the tokens it sees, and it sees the same ones.
    # One pass per batch of questions; a two-pass variant (the prefix with a KV cache, the cache repeated
    # per option, the options as continuations) was measured slower on the toy model (two calls, smaller
    # matrices, a cache copy).

    @torch.inference_mode()
    def loglikelihood(
        self, requests: Sequence[tuple[PromptLike, str]], *, on_batch: OnBatch | None = None
    ) -> list[tuple[float, int]]:
        """For each (user prompt, continuation): the summed log-probability of the continuation's tokens
        and their count; the requests of one prompt share one computation of their common token prefix.

        Identical to the per-option path (:meth:`_loglikelihood_per_option`): the tokens (the rendered
        context's ids, then :meth:`_continuation_ids`'s), the token counts, and how each sum is taken
        (one fp32 vector of per-token log-probabilities, in order, summed by ``Tensor.sum``). Not always
        identical: the last bits of those per-token values, since a packed row multiplies matrices of
        other shapes and attends over other padding than a per-option row (the per-option path itself
        gives other last bits at another batch size). On the toy world (``benchmarks/eval.py`` counts the
        bit-equal sums) the sums differ by at most a few 1e-6 where they differ, and every choice made
        from them (``acc`` and ``acc_norm``; the choices are what a trial stores, never the sums), hence
        every metric, is identical: ``tests/test_loglikelihood_prefix.py`` checks it on both splits.

        Through the per-option path still: requests with images (placeholder tokens and Qwen2-VL's own
        multimodal positions are not packed here), models whose forward takes no ``position_ids`` or whose
        attention ignores a 4-D mask (FlashAttention), and questions whose packed row would outgrow a
        sliding attention window (the mask does not apply it). Text-only questions on image-text models
        (LLaVA, Qwen2.5-VL) are packed.
        """
        contexts, keys, conts = self._encode_requests(requests)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
        packs, window = self._packs_options()
        by_context: dict[Any, list[int]] = {}  # context key -> its requests, in request order
        per_option: list[int] = []
        for i, key in enumerate(keys):
            if packs and contexts[key].ids and not contexts[key].images:
                by_context.setdefault(key, []).append(i)
            else:
                per_option.append(i)
        questions: list[tuple[list[int], _Question]] = []  # (request indices, plan) per context
        empty = 0  # empty continuations of packed questions: (0.0, 0) without a pass
        for key, idx in by_context.items():
            scored = [i for i in idx if conts[i]]
            if not scored:
                empty += len(idx)
                continue
            q = _split_options(contexts[key].ids, [conts[i] for i in scored])
            if window is not None and _row_length(q) > window:
                per_option += idx  # the packed row would outgrow the attention window the mask ignores
                continue
            questions.append((scored, q))
            empty += len(idx) - len(scored)
        if per_option:
            per_option.sort()
            scored_rows = self._score_rows([(contexts[keys[i]], conts[i]) for i in per_option], on_batch)
            for i, v in zip(per_option, scored_rows, strict=True):
                out[i] = v
        # Longest row first (sorted is stable), as the per-option path sorts its rows: little padding.
        questions.sort(key=lambda q: -_row_length(q[1]))
        for batch in _pack([len(idx) for idx, _ in questions], self.batch_size):
            chosen = [questions[b] for b in batch]
            sums = self._score_questions([q for _, q in chosen])
            for (idx, _), values in zip(chosen, sums, strict=True):
                for i, v in zip(idx, values, strict=True):
                    out[i] = v
            if on_batch is not None:
                on_batch(sum(len(idx) for idx, _ in chosen))
        if on_batch is not None and empty:
            on_batch(empty)
        return out

    def _packs_options(self) -> tuple[bool, int | None]:
        """Whether questions can be packed into rows (explicit positions and a 4-D mask the attention
        implementation applies: SDPA's or eager's, not FlashAttention's, which ignores it), and the
        sliding or chunked attention window, if any, that a packed row must fit in."""
        text = self.model.config.get_text_config()
        if not self._takes_positions or text._attn_implementation not in ("sdpa", "eager"):
            return False, None
        window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
        return True, window if isinstance(window, int) else None

    @torch.inference_mode()
    def _loglikelihood_per_option(
        self, requests: Sequence[tuple[PromptLike, str]], *, on_batch: OnBatch | None = None
    ) -> list[tuple[float, int]]:
        """The path before the shared prefix, as it was: every request its own row (context +
        continuation), its context tokenized again per request. The reference that ``benchmarks/eval.py``
        and the tests compare :meth:`loglikelihood` against."""
        contexts: dict[Any, _Encoded] = {}
        rows: list[tuple[_Encoded, list[int]]] = []
        for prompt, continuation in requests:
            key = _context_key(prompt)
            if key not in contexts:
                contexts[key] = self._encode(prompt)
            ctx = contexts[key]
            rows.append((ctx, self._continuation_ids(ctx.text, continuation)))
        return self._score_rows(rows, on_batch)

    def _encode_requests(
        self, requests: Sequence[tuple[PromptLike, str]]
    ) -> tuple[dict[Any, _Encoded], list[Any], list[list[int]]]:
        """The encoded contexts (once per prompt), each request's context key and its continuation ids:
        the ids of :meth:`_encode` and :meth:`_continuation_ids`, with each context tokenized once and all
        the text in two batched tokenizer calls, instead of two calls per request (on the toy model the
        per-request calls cost about a third of the forward passes' time)."""
        contexts: dict[Any, _Encoded] = {}
        keys = [_context_key(prompt) for prompt, _ in requests]
        texts: dict[Any, str] = {}
        for key, (prompt, _) in zip(keys, requests, strict=True):
            if key in contexts or key in texts:
                continue
            if as_prompt(prompt).images:
                contexts[key] = self._encode(prompt)
                texts[key] = contexts[key].text
            else:
                texts[key] = self.render(prompt)
        # The continuation follows the context's *text* tokens (an image context's ids hold the processor's
        # expanded placeholders; _continuation_ids compares with the text's tokens too).
        key_list = list(texts)
        text_ids = dict(zip(key_list, self._token_ids_batch([texts[k] for k in key_list]), strict=True))
        for k in key_list:
            if k not in contexts:
                contexts[k] = _Encoded(texts[k], text_ids[k])
        fulls = self._token_ids_batch(
            [texts[k] + _separator(texts[k]) + cont for k, (_, cont) in zip(keys, requests, strict=True)]
        )
        conts: list[list[int]] = []
        for k, (_, cont), full in zip(keys, requests, fulls, strict=True):
            ctx = text_ids[k]
            conts.append(full[len(ctx) :] if full[: len(ctx)] == ctx else self._token_ids(cont))
        return contexts, keys, conts

    def _token_ids_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`_token_ids` of each text, in one tokenizer call (the same ids: no padding, no specials)."""
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _logprobs(self, inputs: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """fp32 log-softmax over the vocabulary at the last ``keep`` positions of each row."""
        result = self.model(**inputs, logits_to_keep=keep) if self._keeps_logits else self.model(**inputs)
        return torch.log_softmax(result.logits[:, -keep:].float(), dim=-1)

    def _score_rows(
        self, rows: list[tuple[_Encoded, list[int]]], on_batch: OnBatch | None
    ) -> list[tuple[float, int]]:
        """The per-option path: each (context, continuation) a left-padded row of its own."""
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0].ids) + len(rows[i][1])))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            keep = max(len(rows[i][1]) for i in idx) + 1  # continuation token t is predicted at t - 1
            inputs, _ = self._batch([rows[i][0].extended(rows[i][1]) for i in idx])
            logprobs = self._logprobs(inputs, keep)
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

    def _score_questions(self, questions: list[_Question]) -> list[list[tuple[float, int]]]:
        """Per question, per option: (summed log-probability, token count), from one forward pass.

        A question is one row: its prefix, then each option's own tokens but the last (nothing reads the
        prediction made after an option's last token), side by side. The attention mask lets an option's
        tokens see the prefix and the option's earlier tokens, never another option's, and their positions
        continue the prefix's, so each token sees what it sees in the per-option row. Rows are left-padded.
        """
        device = self.device
        layouts = [_layout(q) for q in questions]
        width = max(len(ids) for ids, _, _ in layouts)
        pads = [width - len(row_ids) for row_ids, _, _ in layouts]
        pad_id = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad_id] * n + row for n, (row, _, _) in zip(pads, layouts, strict=True)])
        # Per position: -1 padding, 0 the prefix, k + 1 option k's own tokens.
        segment = torch.tensor([[-1] * n + row for n, (_, row, _) in zip(pads, layouts, strict=True)])
        positions = torch.tensor([[0] * n + row for n, (_, _, row) in zip(pads, layouts, strict=True)])
        # Log-probabilities from the first position that predicts a continuation token to the row's end.
        keep = max(len(row_ids) - q.first + 1 for q, (row_ids, _, _) in zip(questions, layouts, strict=True))
        inputs = {
            "input_ids": ids.to(device),
            "attention_mask": self._option_mask(segment).to(device),
            "position_ids": positions.to(device),
        }
        logprobs = self._logprobs(inputs, keep)
        vocab = logprobs.shape[-1]
        # Where each option's per-token log-probabilities lie (flat index into logprobs.view(-1, vocab)),
        # and the tokens read there, in the continuation's order.
        at: list[int] = []
        tokens: list[int] = []
        places: list[list[int]] = []
        for r, (q, (row_ids, _, _)) in enumerate(zip(questions, layouts, strict=True)):
            # The flat index the row's first token would have (positions before first - 1 are not kept).
            col = r * keep + keep - len(row_ids)
            start = len(q.prefix)  # where the option's own tokens start in the row
            for s in q.suffixes:
                # Continuation tokens inside the prefix and the option's first token: predicted at the
                # prefix's positions first - 1 .. len(prefix) - 1; the option's later tokens at its own.
                own = range(col + start, col + start + len(s) - 1)
                cols = [*range(col + q.first - 1, col + len(q.prefix)), *own]
                places.append(list(range(len(at), len(at) + len(cols))))
                at += cols
                tokens += q.prefix[q.first :] + s
                start += len(s) - 1
        flat = logprobs.reshape(-1, vocab)
        values = flat[torch.tensor(at, device=device), torch.tensor(tokens, device=device)]
        sums = _row_sums(values, places)
        out: list[list[tuple[float, int]]] = []
        o = 0
        for q in questions:
            out.append(sums[o : o + len(q.suffixes)])
            o += len(q.suffixes)
        return out

    def _option_mask(self, segment: torch.Tensor) -> torch.Tensor:
        """The 4-D attention mask of packed question rows, in the form the attention implementation takes
        (boolean for SDPA, additive for eager): causal, and within a row the prefix (segment 0) is seen
        by all, an option (segment k > 0) only by itself. A padding position sees itself only, so that no
        softmax row is empty (an empty one gives NaN, which would reach later layers)."""
        n = segment.shape[1]
        causal = torch.ones((n, n), dtype=torch.bool).tril()
        query, key = segment[:, :, None], segment[:, None, :]
        allowed = causal & (key >= 0) & ((key == 0) | (key == query))
        allowed |= torch.eye(n, dtype=torch.bool) & (query < 0)
        allowed = allowed[:, None]  # [rows, heads (broadcast), query, key]
        if self.model.config.get_text_config()._attn_implementation == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _row_length(q: _Question) -> int:
    return len(q.prefix) + sum(len(s) - 1 for s in q.suffixes)


def _layout(q: _Question) -> tuple[list[int], list[int], list[int]]:
    """One question's packed row: token ids, segments (0 prefix, k + 1 option k) and positions."""
    ids = list(q.prefix)
    segment = [0] * len(q.prefix)
    positions = list(range(len(q.prefix)))
    for k, s in enumerate(q.suffixes):
        own = s[:-1]
        ids += own
        segment += [k + 1] * len(own)
        positions += range(len(q.prefix), len(q.prefix) + len(own))
    return ids, segment, positions


def _context_key(prompt: PromptLike) -> Any:
    """The options of one question share their context: keyed by the prompt, an image prompt by identity."""
    return prompt if isinstance(prompt, str) or not prompt.images else id(prompt)


def _separator(context: str) -> str:
    """Between the rendered context and a continuation: one space, unless the context ends in whitespace."""
    return "" if not context or context[-1].isspace() else " "


def _row_sums(values: torch.Tensor, places: list[list[int]]) -> list[tuple[float, int]]:
    """(sum, count) of ``values[p]`` for each list of places ``p``, summed as the per-option path sums
    (``tensor.sum()`` of its 1-D fp32 vector): the rows of a [rows, n] matrix of equal-length vectors sum
    as each 1-D vector alone (checked in the tests), while zero padding to a common length would change
    the rounding; hence one matrix per length."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(places)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(places):
        by_length.setdefault(len(p), []).append(i)
    for n, idx in by_length.items():
        matrix = values[torch.tensor([places[i] for i in idx], device=values.device)]
        for i, total in zip(idx, matrix.sum(-1).tolist(), strict=True):
            out[i] = (total, n)
    return out


@dataclass(frozen=True)
class _Question:
    """The options of one context, split at the longest token prefix they all share.

    ``prefix`` runs once; ``first`` is where the continuations start in it (the context's length);
    ``suffixes`` are each option's tokens after the prefix, at least one each (the prefix stops one token
    short of the shortest option, so that every option has a token predicted from the prefix's end).
    """

    prefix: list[int]
    first: int
    suffixes: list[list[int]]


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    for i, column in enumerate(zip(*seqs, strict=False)):  # stops at the shortest
        if min(column) != max(column):
            return i
    return min(len(s) for s in seqs)


def _split_options(context: list[int], continuations: list[list[int]]) -> _Question:
    """Plan one question: ``continuations`` are non-empty token lists that follow ``context``."""
    full = [context + c for c in continuations]
    # Never shorter than the context (the options share it), never the whole of any option.
    cut = min(_common_prefix_len(full), min(len(f) for f in full) - 1)
    return _Question(full[0][:cut], len(context), [f[cut:] for f in full])


def _pack(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive groups of indices whose sizes sum to at most ``limit`` (a larger one alone): questions
    per batch, so that a batch holds about as many option rows as the per-option path's."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= limit:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups
