"""Lazy access to a Hugging Face checkpoint directory: safetensors only, one tensor at a time.

A directory holds either one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
Opening it reads the safetensors headers only (names, shapes, dtypes, byte ranges), checked against the
file sizes so that a truncated or corrupt file fails at open time, not half-way through a merge;
:meth:`Checkpoint.load` then reads one tensor. Pickle weights (``.bin``, ``.pt``) are never loaded: they
run code when unpickled.

Names exist in two spellings. *Disk keys* are what the files hold; *model names* are what the live
transformers model calls the same parameters (``model.named_parameters()``), which can differ: transformers 5
saves LLaVA's language model as ``language_model.model.*`` but holds it as ``model.language_model.*``.
:attr:`Checkpoint.layout` renames disk keys into model names with transformers' own conversion table, on
a model built on the meta device (no memory), so that every other module works in model names only.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import torch

from safesearch.digests import sha256_file, top_files
from safesearch.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype codes -> torch dtypes (the ones a model checkpoint can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # where its bytes start in the file

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelLayout:
    """The live model's view of a checkpoint, in model names.

    ``names`` maps every model name the checkpoint provides to its disk key; ``parameters`` lists the model's
    own parameters (tied copies counted once) with their shapes, in the model's order; ``aliases`` maps a
    tied name (``lm_head.weight`` when embeddings are tied) to the parameter it shares storage with.
    """

    architecture: str
    names: dict[str, str]
    parameters: dict[str, tuple[int, ...]]
    aliases: dict[str, str]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file, read from its header and checked against its size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: corrupt safetensors file (header length {n} does not fit its {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read safetensors file: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors file (bad header entry for tensor {key!r})") from None
        info = TensorInfo(key, path, shape, dtype, 8 + n + start)
        if not 0 <= start <= end <= data_size or end - start != info.numel * dtype.itemsize:
            raise UserError(
                f"{path}: corrupt safetensors file (tensor {key!r} at bytes {start}-{end} does not fit "
                f"its shape {list(shape)} or the file's {data_size} data bytes; truncated?)"
            )
        out[key] = info
    return out


class Checkpoint:
    """A Hugging Face model directory opened lazily: headers at open, tensors on :meth:`load`.

    Raises :class:`UserError` for a missing directory, no safetensors weights (pickle weights refused with
    how to convert them), an index naming a missing shard or a tensor its shard lacks, or a corrupt file.
    """

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or str(self.path)
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise UserError(f"checkpoint {self.label}: {what}")
        self.tensors: dict[str, TensorInfo] = self._read_headers()
        self._handles: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"

    def _read_headers(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            return self._read_index(index)
        if single.is_file():
            return read_safetensors_header(single)
        loose = sorted(self.path.glob("*.safetensors"))
        if len(loose) == 1:
            return read_safetensors_header(loose[0])
        if loose:
            raise UserError(
                f"checkpoint {self.label}: {len(loose)} safetensors files but no {INDEX_FILE} saying which tensor is where"
            )
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(
                f"checkpoint {self.label}: holds pickle weights ({', '.join(pickles[:3])}), which safesearch never loads "
                "(unpickling runs code); convert them once where you trust the source: python -c \"import sys, transformers; "
                "transformers.AutoModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\" DIR NEW_DIR"
            )
        raise UserError(f"checkpoint {self.label}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _read_index(self, index: Path) -> dict[str, TensorInfo]:
        from safesearch.textfiles import read_json

        weight_map = read_json(index, "checkpoint index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: corrupt index (expected JSON with a 'weight_map' object)")
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for key, shard_name in weight_map.items():
            if shard_name not in headers:
                shard = self.path / str(shard_name)
                if not shard.is_file():
                    raise UserError(f"{index}: names shard {shard_name!r} (for {key!r}), which is missing")
                headers[shard_name] = read_safetensors_header(shard)
            info = headers[shard_name].get(key)
            if info is None:
                raise UserError(f"{index}: says {key!r} is in {shard_name!r}, which does not hold it")
            out[key] = info
        return out

    # -- files ---------------------------------------------------------------------------------------

    @cached_property
    def config(self) -> dict:
        """``config.json`` as a dict (empty when the directory has none)."""
        from safesearch.textfiles import read_json

        path = self.path / "config.json"
        if not path.is_file():
            return {}
        try:
            data = read_json(path, "config")
        except UserError as e:
            raise UserError(f"checkpoint {self.label}: {e.message}") from None
        if not isinstance(data, dict):
            raise UserError(f"checkpoint {self.label}: {path} is not a JSON object")
        return data

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else str(self.config.get("model_type", "unknown"))

    @property
    def weight_files(self) -> list[Path]:
        files = sorted({info.file for info in self.tensors.values()})
        index = self.path / INDEX_FILE
        return [index, *files] if index.is_file() else files

    def files(self) -> list[Path]:
        """Every regular file at the top of the directory (what an export's provenance hashes)."""
        return top_files(self.path)

    def sha256(self) -> dict[str, str]:
        """sha256 of every file of the directory, by file name."""
        return {p.name: sha256_file(p) for p in self.files()}

    # -- tensors -------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def load(self, key: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by disk key, read from its file, optionally cast and moved.

        Read with ``preadv`` into a tensor of its own, not memory-mapped: the file's pages stay in the page
        cache instead of counting in the process's memory, and threads may read at once.
        """
        info = self.tensors[key]
        try:
            t = self._read(info)
        except OSError as e:
            raise UserError(f"{info.file}: cannot read tensor {key!r}: {e}") from None
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if torch.device(device) != t.device else t

    def load_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of a tensor (in its flat, row-major order), as a 1-D tensor of its dtype."""
        info = self.tensors[key]
        if not 0 <= start <= stop <= info.numel:
            raise IndexError(f"{key}: elements {start}:{stop} of {info.numel}")
        try:
            return self._read(info, start, stop)
        except OSError as e:
            raise UserError(f"{info.file}: cannot read tensor {key!r}: {e}") from None

    def _read(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if sys.byteorder != "little":  # the bytes are little-endian: let safetensors swap them on such a host
            from safetensors import safe_open

            with safe_open(str(info.file), framework="pt") as f:
                t = f.get_tensor(info.key)
            return t if stop is None else t.reshape(-1)[start:stop].clone()
        size = info.dtype.itemsize
        nbytes = info.nbytes if stop is None else (stop - start) * size
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(raw.numpy())
            fd = self._fd(info.file)
            at = info.offset + start * size
            done = 0
            while done < nbytes:  # preadv may return less than asked (at most 2 GiB a call on Linux)
                n = os.preadv(fd, [view[done:]], at + done)
                if n <= 0:
                    raise OSError(f"the file ends {nbytes - done} bytes early (truncated since it was opened?)")
                done += n
        return raw.view(info.dtype) if stop is not None else raw.view(info.dtype).view(info.shape)

    def _fd(self, file: Path) -> int:
        with self._lock:  # the export reads from a read-ahead thread
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = file.open("rb", buffering=0)
            return handle.fileno()

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    # -- model names -----------------------------------------------------------------------------------

    @cached_property
    def layout(self) -> ModelLayout:
        """Disk keys renamed to the live model's names, and the model's parameters (see the module docstring)."""
        model = _meta_model(self)
        if model is None:
            names = {k: k for k in self.tensors}
            params = {k: info.shape for k, info in self.tensors.items() if info.dtype.is_floating_point}
            return ModelLayout(self.architecture, names, params, {})
        by_id: dict[int, str] = {}
        params: dict[str, tuple[int, ...]] = {}
        for name, p in model.named_parameters():
            by_id[id(p)] = name
            params[name] = tuple(p.shape)
        aliases = {
            name: by_id[id(p)]
            for name, p in model.named_parameters(remove_duplicate=False)
            if name not in params and id(p) in by_id
        }
        state = dict.fromkeys(model.state_dict(), True)
        rename = _renamer(model, state)
        names: dict[str, str] = {}
        for key in self.tensors:
            name = rename(key)
            if name in names:
                raise UserError(f"checkpoint {self.label}: disk keys {names[name]!r} and {key!r} both mean {name!r}")
            names[name] = key
        for name, shape in params.items():
            key = names.get(name)
            if key is None:
                raise UserError(f"checkpoint {self.label}: lacks parameter {name!r} of its {self.architecture}")
            if self.tensors[key].shape != shape:
                raise UserError(
                    f"checkpoint {self.label}: tensor {key!r} has shape {list(self.tensors[key].shape)}, "
                    f"its config says {list(shape)}"
                )
        return ModelLayout(self.architecture, names, params, aliases)

    def iter_named(self) -> Iterator[tuple[str, TensorInfo]]:
        """(model name, tensor info) for every tensor of the checkpoint."""
        for name, key in self.layout.names.items():
            yield name, self.tensors[key]


def check_model(path: Path) -> Checkpoint:
    """A model directory to evaluate, checked without loading its weights: a config.json that is a JSON
    object transformers can read, safetensors weights (pickle weights refused) whose headers fit their
    files, and tensors of the shapes the config says."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model {path}: {'is not a directory' if path.exists() else 'does not exist'}")
    if not (path / "config.json").is_file():
        raise UserError(f"model {path}: has no config.json (not a Hugging Face model directory)")
    ckpt = Checkpoint(path, label=str(path))
    _ = ckpt.config, ckpt.layout
    return ckpt


def _meta_model(ckpt: Checkpoint) -> torch.nn.Module | None:
    """The checkpoint's model class built on the meta device, or None when transformers does not know it."""
    import transformers

    if not ckpt.config:
        return None
    cls = getattr(transformers, ckpt.architecture, None)
    named = bool(ckpt.config.get("architectures"))
    if named and (cls is None or not hasattr(cls, "_from_config")):
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        if not named:  # a model_type transformers does not know: the names as stored, as for custom code
            return None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {ckpt.label}: config.json cannot be read by transformers: {reason}") from None
    with torch.device("meta"):
        if named:
            return cls._from_config(config)
        # No architectures named: the class transformers' Auto loader would build from model_type, so that
        # a config whose sizes disagree with the tensors is caught here, not by allocating the model.
        auto = (transformers.AutoModelForImageTextToText if "vision_config" in ckpt.config
                else transformers.AutoModelForCausalLM)
        try:
            return auto.from_config(config)
        except (ValueError, KeyError):
            return None


def _renamer(model: torch.nn.Module, state: dict[str, bool]):
    """A function renaming a disk key to the model's name for it, with transformers' conversion table."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError):  # an older/newer transformers without this table: names as stored
        return lambda key: key
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        name, converter = rename_source_key(key, renamings, converters, prefix, state)
        if converter is not None:
            # A converter fuses or splits tensors (MoE experts): no longer one disk tensor per parameter.
            raise UserError(
                f"tensor {key!r}: transformers converts it with {converter!r} when loading; "
                "safesearch grafts only models whose checkpoint tensors are the model's parameters"
            )
        return name

    return rename


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
