"""Reading the text files users hand us: specs, coefficient tables, suites, benchmark files.

Every failure is one :class:`~safesearch.errors.UserError` naming the file, and the line where there is
one: nothing there, a directory where a file belongs, no permission, bytes that are not UTF-8 (line and
byte named), malformed JSON or YAML. A UTF-8 byte-order mark (what Windows editors and spreadsheet
exports write) is accepted and dropped, so that the first field or key keeps its name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safesearch.errors import UserError

_BOM = b"\xef\xbb\xbf"


def read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes, or one line saying why they cannot be had."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path}: does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path}: is a directory, not a file") from None
    except NotADirectoryError:
        raise UserError(f"{what} {path}: a parent of it is a file, not a directory") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror or e})") from None


def decode(raw: bytes, path: Path, what: str) -> str:
    """``raw`` as UTF-8 without a leading byte-order mark; bad bytes are named by line and value."""
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{what} {path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def read_text(path: Path, what: str) -> str:
    """The file as text (UTF-8, a byte-order mark dropped)."""
    return decode(read_bytes(path, what), Path(path), what)


def parse_json(text: str, path: Path, lineno: int | None = None, noun: str = "JSON", what: str = "") -> Any:
    """``text`` as one JSON value: the whole of ``path``, or its line ``lineno``. NaN and Infinity,
    which JSON does not have, nesting too deep for Python and integers of thousands of digits are
    refused like malformed JSON. ``what`` (the file's role) starts the message."""
    lead = f"{what} {path}" if what else str(path)
    where = f"{lead}:{lineno}" if lineno is not None else lead
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        line = lineno if lineno is not None else e.lineno
        raise UserError(f"{lead}:{line}: malformed {noun} ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: malformed {noun} (nested too deeply)") from None
    except ValueError as e:  # NaN/Infinity, or an integer of thousands of digits
        raise UserError(f"{where}: malformed {noun} ({e})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path, what: str) -> Any:
    """The file as one JSON value (see :func:`parse_json`); an empty file is named as such."""
    text = read_text(path, what)
    if not text.strip():
        raise UserError(f"{what} {path}: the file is empty")
    return parse_json(text, Path(path), what=what)


def read_yaml(path: Path, what: str) -> Any:
    """The file as YAML (safe loader)."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what} {where}: not valid YAML ({problem})") from None
