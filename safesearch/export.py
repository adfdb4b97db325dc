"""Export a merged model as a Hugging Face checkpoint: exactly the weights that were merged, streamed.

The shards are written tensor by tensor (the safetensors header is computed up front from the anchor's
shapes, then each tensor's bytes follow). Three threads overlap: a read-ahead thread reads what the next
tensors need (with a :class:`~safesearch.streaming.StreamingMerger`, each parameter's anchor tensor and
its vectors, computed from the checkpoints just then), the caller's thread merges, and a writer thread
writes and hashes the tensor before. So memory holds a few tensors (plus the resident merger when one is
given), never the model twice. The tensors keep the anchor checkpoint's own keys, so anything that loads
the anchor loads the export. Config, generation config, tokenizer, processor and chat template files are
copied from the anchor (:func:`needed_files`; the rest of its folder is left out and named in
``anchor_files``), and ``safesearch.json`` records the coefficients, the spec (vector definitions,
groups), the sha256 of every input file (hashed beside the merge when the command started a
:class:`~safesearch.digests.BackgroundDigests`) and of every written shard, and the package version.

Everything is written into a hidden temporary directory next to ``out`` and renamed at the end: an
interrupted export leaves nothing at ``out``; an existing ``out`` is refused unless ``overwrite``. What a
killed export left (``.OUT.partial-*``, ``.OUT.old-*``) is removed by the next export to ``out``: one
export per ``out`` at a time. A merged tensor holding NaN or inf (coefficients that overflow the working
dtype, or an input that holds them) stops the export, naming the tensor; nothing is written.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import queue
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch

from safesearch import __version__
from safesearch.checkpoint import DTYPE_CODES, INDEX_FILE, SINGLE_FILE, Checkpoint, natural_key
from safesearch.digests import BackgroundDigests
from safesearch.errors import UserError
from safesearch.merging import Coefficients, Merger
from safesearch.outputs import PROVENANCE_FILE
from safesearch.streaming import StreamingMerger

DEFAULT_SHARD_BYTES = 5 * 1024**3
# The anchor's files a checkpoint needs to load and to be prompted as the anchor was: its config and
# generation config, tokenizer, processor and chat template. Anything else in the anchor's folder (a README,
# training arguments, an optimizer state, notes) is left out of the export, and named.
NEEDED_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.json", "chat_template.jinja",
})
NEEDED_SUFFIXES = (".tiktoken", ".jinja")
# The anchor's safetensors weights: the export writes its own (and its own provenance), so these are
# neither copied nor named; other weight files (a .bin copy, an optimizer state) are named as left out.
_WEIGHT_SUFFIXES = (".safetensors",)
_WEIGHT_INDEXES = ("model.safetensors.index.json",)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def write_safetensors(path: Path, planned: list[PlannedTensor], produce: Callable[[str], torch.Tensor]) -> str:
    """Write a safetensors file tensor by tensor; ``produce(key)`` gives each tensor just before it is written.

    Write-behind: a tensor is written (and hashed) on a writer thread while ``produce`` makes the next one,
    so the tensor ``produce`` returns must stay unchanged until ``produce`` is called twice more (a new
    tensor, a parameter, or a ring of two buffers). Returns the file's sha256.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in planned:
        header[p.key] = {"dtype": DTYPE_CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()

    def write(f: BinaryIO, t: torch.Tensor) -> None:
        # write and sha256 both release the GIL on a large buffer: this runs beside the next merge
        data = memoryview(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
        f.write(data)
        digest.update(data)

    with path.open("wb") as f, ThreadPoolExecutor(1, thread_name_prefix="safesearch-write") as writer:
        for block in (struct.pack("<Q", len(raw)), raw):
            f.write(block)
            digest.update(block)
        pending: Future | None = None
        try:
            for p in planned:
                t = produce(p.key)
                if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                    raise ValueError(f"{p.key}: produced {list(t.shape)} {t.dtype}, planned {list(p.shape)} {p.dtype}")
                if pending is not None:
                    pending.result()  # one write in flight at most: produce may now reuse that tensor's buffer
                pending = writer.submit(write, f, t)
        finally:
            if pending is not None:  # on an error too: nothing may still write once the caller cleans up
                pending.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


class ReadAhead:
    """``load(key)`` for ``keys`` in order on a thread of its own, up to ``depth`` keys ahead of :meth:`take`.

    A key is anything comparable: the export's are (tensor key, part).

    Reading a checkpoint (``preadv``) and computing the vectors release the GIL, so they run beside the
    merge and the write of the tensors before. :meth:`take` must ask for the keys in their order; an error
    of ``load`` is raised there. :meth:`close` stops the thread early (after an error of the caller's).
    """

    def __init__(self, keys: list[Any], load: Callable[[Any], Any], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(keys, load), name="safesearch-read", daemon=True)
        self._thread.start()

    def _run(self, keys: list[Any], load: Callable[[Any], Any]) -> None:
        for key in keys:
            if self._stop.is_set():
                return
            try:
                item = (key, load(key), None)
            except BaseException as e:  # raised again in the caller's thread by take
                item = (key, None, e)
            self._queue.put(item)
            if item[2] is not None:
                return

    def take(self, key: Any) -> Any:
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        if got != key:
            raise RuntimeError(f"read-ahead: asked for {key!r}, next is {got!r}")
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a put on the full queue, then let the thread see the flag
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)


def plan_shards(planned: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def export_merged(
    merger: Merger | StreamingMerger,
    coefs: Coefficients,
    out: str | Path,
    *,
    overwrite: bool = False,
    params: Mapping[str, torch.Tensor] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_provenance: Mapping[str, Any] | None = None,
    digests: BackgroundDigests | None = None,
) -> Path:
    """Write the merge of ``coefs`` as a checkpoint directory at ``out`` and return its path.

    ``merger``: a :class:`~safesearch.streaming.StreamingMerger` (what a one-off export wants: it reads
    each tensor's inputs just before merging it, on a read-ahead thread) or a resident :class:`Merger` from
    :meth:`Merger.from_spec` (a study's, which holds them already); both give the same bytes.
    ``params``: the live model's parameters after :meth:`Merger.apply` for ``coefs`` (``dict(model.named_
    parameters())``); when given, the merged tensors are read from them, i.e. exactly the weights that were
    scored, else they are merged again (same arithmetic, same device). ``digests``: the input checkpoints'
    sha256 already being computed (:class:`~safesearch.digests.BackgroundDigests`); else they are hashed
    here, at the end.
    """
    if merger.sources is None:
        raise ValueError("export_merged needs a Merger built with Merger.from_spec (it copies from the anchor)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    sources = merger.sources
    anchor = sources.anchor
    layout = anchor.layout
    name_of = {key: name for name, key in layout.names.items()}
    merged_names = set(merger.names)

    def dtype_of(key: str) -> torch.dtype:
        name = name_of.get(key, key)
        return merger.dtype if (name in layout.parameters or name in layout.aliases) else anchor.tensors[key].dtype

    def model_name(key: str) -> str:
        name = name_of.get(key, key)
        return layout.aliases.get(name, name)  # a tied copy is written with its parameter's value

    planned = [
        PlannedTensor(key, anchor.tensors[key].shape, dtype_of(key)) for key in sorted(anchor.tensors, key=natural_key)
    ]
    streaming = isinstance(merger, StreamingMerger) and params is None
    # Two tensor-sized buffers, used in turn: one being written while the next tensor is merged into the other.
    largest = max((p.nbytes for p in planned), default=0) if params is None else 0
    buffers = [torch.empty(largest, dtype=torch.uint8, device=merger.device) for _ in range(2)]
    turn = [0]

    def parts(key: str) -> list[slice | None]:
        """The pieces the read-ahead thread reads ``key`` in (see :meth:`StreamingMerger.parts`)."""
        name = model_name(key)
        return merger.parts(name) if streaming and name in merged_names else [None]  # type: ignore[union-attr]

    def load(unit: tuple[str, slice | None]) -> Any:
        """On the read-ahead thread: what producing a tensor (or a part of it) needs from disk."""
        key, part = unit
        name = model_name(key)
        if name in merged_names:
            return merger.load(name, part) if streaming else None  # type: ignore[union-attr]
        return anchor.load(key, dtype=dtype_of(key))  # untouched: the anchor's value (as the model loads it)

    def produce(key: str) -> torch.Tensor:
        name = model_name(key)
        if name not in merged_names:
            return reader.take((key, None))
        if params is not None:
            reader.take((key, None))
            return _finite(key, params[name])
        p = by_key[key]
        buffer = buffers[turn[0]]
        turn[0] ^= 1
        view = buffer[: p.nbytes].view(p.dtype).view(p.shape)
        if not streaming:
            reader.take((key, None))
            return _finite(key, merger.merge_one(name, coefs, view))  # type: ignore[union-attr]
        flat = view.view(-1)
        for part in units[key]:
            loaded = reader.take((key, part))
            merger.merge_loaded(name, loaded, coefs, view if part is None else flat[part])  # type: ignore[union-attr]
        return _finite(key, view)

    by_key = {p.key: p for p in planned}
    units = {p.key: parts(p.key) for p in planned}
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*glob.glob(glob.escape(str(out.parent / f".{out.name}.partial-")) + "*"),
                  *glob.glob(glob.escape(str(out.parent / f".{out.name}.old-")) + "*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    # Four pieces ahead, two where a piece is a large whole tensor (an embedding read whole can be a GB).
    depth = 2 if any(ps == [None] and by_key[k].nbytes > 64 << 20 for k, ps in units.items()) else 4
    reader = ReadAhead([(p.key, part) for p in planned for part in units[p.key]], load, depth=depth)
    try:
        shards = plan_shards(planned, shard_bytes)
        names = (
            [SINGLE_FILE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        written = {name: write_safetensors(tmp / name, shard, produce) for name, shard in zip(names, shards, strict=True)}
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(p.nbytes for p in planned)},
                "weight_map": {p.key: name for name, shard in zip(names, shards, strict=True) for p in shard},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files = _copy_aux_files(anchor, tmp, merger.dtype)
        provenance = {
            "safesearch_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "coefficients": coefs,
            "dtype": _DTYPE_NAMES.get(merger.dtype, str(merger.dtype)),
            "spec": sources.spec.to_dict(),
            "groups": {g: len(ps) for g, ps in merger.grouping.groups.items()},
            "frozen": merger.grouping.frozen,
            "inputs": {
                name: {"path": str(c.path), "sha256": digests.get(c.path) if digests else c.sha256()}
                for name, c in sources.checkpoints.items()
            },
            "outputs": {"sha256": written},
            "anchor_files": files,  # what was copied from the anchor's folder, and what was left out
            **dict(extra_provenance or {}),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _replace(tmp, out, overwrite)
    except BaseException:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _finite(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, once it is known to hold no NaN or inf (min and max propagate both; no copy of ``t``)."""
    if t.numel() and t.is_floating_point():
        lo, hi = torch.aminmax(t.detach())
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise UserError(f"merged tensor {key!r} holds NaN or inf values (coefficients too large for "
                            f"{str(t.dtype).removeprefix('torch.')}, or an input holds them); nothing was written")
    return t


def needed_files(names: list[str], config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(the anchor's files an export copies, the ones it leaves out) among ``names``; its safetensors
    weights and its own provenance are in neither (the export writes its own). A config with ``auto_map`` (a model
    with its own code, loaded with ``trust_remote_code``) needs its Python files too."""
    own_code = bool(config.get("auto_map"))
    copied, left = [], []
    for name in sorted(names):
        if name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES or name in (INDEX_FILE, PROVENANCE_FILE):
            continue
        if name in NEEDED_FILES or name.endswith(NEEDED_SUFFIXES) or (own_code and name.endswith(".py")):
            copied.append(name)
        else:
            left.append(name)
    return copied, left


def _copy_aux_files(anchor: Checkpoint, dst: Path, dtype: torch.dtype) -> dict[str, list[str]]:
    """Copy the anchor's :func:`needed_files` into ``dst`` (the config's dtype set to the export's);
    returns ``{"copied": [...], "left_out": [...]}`` for the provenance and the user."""
    files = {f.name: f for f in anchor.files()}
    source_config = files.get("config.json")
    config_data = json.loads(source_config.read_text()) if source_config is not None else {}
    copied, left = needed_files(list(files), config_data if isinstance(config_data, dict) else {})
    for name in copied:
        shutil.copy2(files[name], dst / name)
    _set_config_dtype(dst, dtype)
    return {"copied": copied, "left_out": left}


def _set_config_dtype(dst: Path, dtype: torch.dtype) -> None:
    config = dst / "config.json"
    if config.is_file() and dtype in _DTYPE_NAMES:
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        if any(data.get(k) != _DTYPE_NAMES[dtype] for k in keys):  # the export's tensors are in the working dtype
            for k in keys:
                data[k] = _DTYPE_NAMES[dtype]
            config.write_text(json.dumps(data, indent=2) + "\n")


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
