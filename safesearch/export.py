"""Export a merged model as a Hugging Face checkpoint: exactly the weights that were merged, streamed.

The shards are written tensor by tensor (the safetensors header is computed up front from the anchor's
shapes, then each tensor's bytes follow), so memory holds the resident merger plus one tensor, never the
model twice. The tensors keep the anchor checkpoint's own keys, so anything that loads the anchor loads
the export. Config, generation config, tokenizer, processor and chat template files are copied from the
anchor, and ``safesearch.json`` records the coefficients, the spec (vector definitions, groups), the sha256
of every input file and of every written shard, and the package version.

Everything is written into a hidden temporary directory next to ``out`` and renamed at the end: an
interrupted export leaves nothing at ``out``; an existing ``out`` is refused unless ``overwrite``. What a
killed export left (``.OUT.partial-*``, ``.OUT.old-*``) is removed by the next export to ``out``: one
export per ``out`` at a time. A merged tensor holding NaN or inf (coefficients that overflow the working
dtype, or an input that holds them) stops the export, naming the tensor; nothing is written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from safesearch import __version__
from safesearch.checkpoint import DTYPE_CODES, INDEX_FILE, SINGLE_FILE, Checkpoint, natural_key
from safesearch.errors import UserError
from safesearch.merging import Coefficients, Merger
from safesearch.outputs import PROVENANCE_FILE

DEFAULT_SHARD_BYTES = 5 * 1024**3
# Non-weight files of the anchor worth carrying over: configs, tokenizer, processor, chat template.
_AUX_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
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

    Returns the file's sha256.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in planned:
        header[p.key] = {"dtype": DTYPE_CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for block in (struct.pack("<Q", len(raw)), raw):
            f.write(block)
            digest.update(block)
        for p in planned:
            t = produce(p.key)
            if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                raise ValueError(f"{p.key}: produced {list(t.shape)} {t.dtype}, planned {list(p.shape)} {p.dtype}")
            data = memoryview(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


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
    merger: Merger,
    coefs: Coefficients,
    out: str | Path,
    *,
    overwrite: bool = False,
    params: Mapping[str, torch.Tensor] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the merge of ``coefs`` as a checkpoint directory at ``out`` and return its path.

    ``params``: the live model's parameters after :meth:`Merger.apply` for ``coefs`` (``dict(model.named_
    parameters())``); when given, the merged tensors are read from them, i.e. exactly the weights that were
    scored, else they are merged again (same arithmetic, same device). Requires a merger from
    :meth:`Merger.from_spec`.
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

    def dtype_of(key: str) -> torch.dtype:
        name = name_of.get(key, key)
        return merger.dtype if (name in layout.parameters or name in layout.aliases) else anchor.tensors[key].dtype

    planned = [
        PlannedTensor(key, anchor.tensors[key].shape, dtype_of(key)) for key in sorted(anchor.tensors, key=natural_key)
    ]
    # One tensor-sized buffer, reused for every merged tensor (none when reading the live parameters).
    largest = max((p.nbytes for p in planned), default=0) if params is None else 0
    buffer = torch.empty(largest, dtype=torch.uint8, device=merger.device)

    def produce(key: str) -> torch.Tensor:
        name = name_of.get(key, key)
        name = layout.aliases.get(name, name)  # a tied copy is written with its parameter's value
        if name in merger.anchor:
            if params is not None:
                return _finite(key, params[name])
            a = merger.anchor[name]
            view = buffer[: a.numel() * a.element_size()].view(a.dtype).view(a.shape)
            return _finite(key, merger.merge_one(name, coefs, view))
        return anchor.load(key, dtype=dtype_of(key))  # untouched: the anchor's value (as the model loads it)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*glob.glob(glob.escape(str(out.parent / f".{out.name}.partial-")) + "*"),
                  *glob.glob(glob.escape(str(out.parent / f".{out.name}.old-")) + "*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
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
        _copy_aux_files(anchor, tmp, merger.dtype)
        provenance = {
            "safesearch_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "coefficients": coefs,
            "dtype": _DTYPE_NAMES.get(merger.dtype, str(merger.dtype)),
            "spec": sources.spec.to_dict(),
            "groups": {g: len(ps) for g, ps in merger.grouping.groups.items()},
            "frozen": merger.grouping.frozen,
            "inputs": {
                name: {"path": str(c.path), "sha256": c.sha256()} for name, c in sources.checkpoints.items()
            },
            "outputs": {"sha256": written},
            **dict(extra_provenance or {}),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _replace(tmp, out, overwrite)
    except BaseException:
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


def _copy_aux_files(anchor: Checkpoint, dst: Path, dtype: torch.dtype) -> None:
    skip = {INDEX_FILE, PROVENANCE_FILE}
    for f in anchor.files():
        if f.suffix in _AUX_SUFFIXES and f.name not in skip:
            shutil.copy2(f, dst / f.name)
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
