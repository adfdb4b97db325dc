"""Where a command writes, checked before its work starts, so that no result is lost at the end and no
input is ever overwritten.

- :func:`check_output_file`: a report or a plot (``eval --json``, ``pareto --plot``): not a directory,
  under a folder that exists or can be made, and writable.
- :func:`check_output_dir`: a checkpoint directory (``merge``/``export --out``): the same, plus the
  guard on what it may replace. It must not be, contain or lie inside an input checkpoint, nor be or
  contain any other input (the spec's folder, a coefficient file, the study database), since
  ``--overwrite`` replaces the whole directory; and ``--overwrite`` replaces only an earlier export (a
  directory with ``safesearch.json``) or an empty directory, never a folder of the user's own files.

Writability is probed by creating and removing a hidden temporary entry in the nearest existing folder:
permissions alone do not tell (root may write anywhere but in ``/proc``; a read-only mount).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from safesearch.errors import UserError

PROVENANCE_FILE = "safesearch.json"


def existing_ancestor(path: Path, what: str) -> Path:
    """The nearest folder above ``path`` that exists; a file on the way is an error."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a directory")
            return parent
    return Path(path.anchor or ".")


def _probe(folder: Path, path: Path, what: str) -> None:
    try:
        probe = tempfile.mkdtemp(prefix=".safesearch-probe-", dir=folder)
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None


def check_output_file(path: Path, what: str) -> None:
    """``path`` can be written as a file (its folders may be missing; they are made when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, not a file")
    _probe(existing_ancestor(path, what), path, what)


def check_output_dir_writable(path: Path, what: str) -> None:
    """``path`` is a directory, or one can be made there, and it is writable (created nothing)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {path}: is a file, not a directory")
        _probe(path, path, what)
    else:
        _probe(existing_ancestor(path, what), path, what)


def check_output_dir(
    out: Path,
    what: str,
    *,
    overwrite: bool,
    checkpoints: Sequence[tuple[str, Path]] = (),
    inputs: Sequence[tuple[str, Path]] = (),
) -> None:
    """``out`` may receive a checkpoint directory (see the module docstring).

    ``checkpoints``: (label, directory) of the input checkpoints (no overlap at all); ``inputs``: (label,
    path) of other inputs that ``out`` must not be or contain.
    """
    out = Path(out)
    real = out.resolve()
    for label, path in checkpoints:
        p = Path(path).resolve()
        if real == p or p in real.parents or real in p.parents:
            how = "is" if real == p else "lies inside" if p in real.parents else "contains"
            raise UserError(f"{what} {out}: {how} the input checkpoint {label} ({path}); choose another directory")
    for label, path in inputs:
        p = Path(path).resolve()
        if real == p or real in p.parents:
            raise UserError(f"{what} {out}: {'is' if real == p else 'contains'} {label} ({path}); "
                            "choose another directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"{what} {out}: is a file, not a directory")
        if not overwrite:
            raise UserError(f"{what} {out}: already exists (pass --overwrite to replace it)")
        if not (out / PROVENANCE_FILE).is_file() and any(out.iterdir()):
            raise UserError(f"{what} {out}: --overwrite replaces only an earlier export (a directory with "
                            f"{PROVENANCE_FILE}) or an empty directory; this one holds other files")
    _probe(existing_ancestor(out, what), out, what)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by way of a temporary file beside it, renamed over it once complete: an
    interrupted write leaves the old file (or none), never half of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def left_out_note(checkpoint: Path) -> str | None:
    """One line naming the anchor's files an export left out (``anchor_files`` of its provenance: files a
    checkpoint does not need to load), or None when it left none out."""
    import json

    data = json.loads((checkpoint / PROVENANCE_FILE).read_text())
    left = data.get("anchor_files", {}).get("left_out", [])
    if not left:
        return None
    return f"left out of {checkpoint} (the anchor's files a checkpoint does not need): {', '.join(left)}"
