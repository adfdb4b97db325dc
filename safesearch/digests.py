"""sha256 of checkpoint files, for an export's provenance, optionally hashed in a background thread.

An export records the sha256 of every file of every input checkpoint: gigabytes to read and hash, work that
needs no torch. :class:`BackgroundDigests` starts it as soon as the command knows the checkpoints (before it
imports torch and transformers, which take seconds of one core), on a thread of its own: hashlib releases
the GIL while it hashes a large block, so the hashing runs on the other core beside the imports and the
merge. This module imports nothing heavy, so that a command can start the hashing first.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safesearch.graftspec import GraftSpec

CHUNK = 1 << 24


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])  # no bytes object per block: readinto reuses one buffer
    return h.hexdigest()


def top_files(folder: Path) -> list[Path]:
    """Every regular, not hidden, file at the top of ``folder``, sorted: a checkpoint's files."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder, by file name."""
    return {p.name: sha256_file(p) for p in top_files(folder)}


class BackgroundDigests:
    """:func:`folder_digests` of some folders, computed on a daemon thread started at construction.

    :meth:`get` waits for a folder's digests; an error met while hashing (a file that vanished) is raised
    there. A daemon thread: an export that fails or is interrupted does not wait for the hashing to end.
    """

    def __init__(self, folders: Iterable[str | Path]) -> None:
        self._folders = list(dict.fromkeys(Path(f).resolve() for f in folders))
        self._done: dict[Path, threading.Event] = {f: threading.Event() for f in self._folders}
        self._results: dict[Path, dict[str, str] | BaseException] = {}
        self._thread = threading.Thread(target=self._run, name="safesearch-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for folder in self._folders:
            try:
                self._results[folder] = folder_digests(folder)
            except BaseException as e:  # handed to the caller of get, whatever it was
                self._results[folder] = e
            self._done[folder].set()

    def get(self, folder: str | Path) -> dict[str, str]:
        """The digests of ``folder`` (hashed now, on this thread, if it was not one of the folders given)."""
        key = Path(folder).resolve()
        if key not in self._done:
            return folder_digests(key)
        self._done[key].wait()
        result = self._results[key]
        if isinstance(result, BaseException):
            raise result
        return result


def spec_digests(spec: GraftSpec) -> BackgroundDigests:
    """:class:`BackgroundDigests` of the checkpoints ``spec`` merges (those an export's provenance lists)."""
    used = {spec.anchor} | {c for v in spec.vectors.values() for c in (v.plus, v.minus)}
    return BackgroundDigests(c.path for n, c in spec.checkpoints.items() if n in used)
