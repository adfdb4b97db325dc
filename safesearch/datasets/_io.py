"""File access shared by the readers: every failure names the file (and line) and what was expected."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safesearch.errors import UserError


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a UserError saying where we looked and what belongs there."""
    if not path.is_file():
        raise UserError(f"{what}: no file at '{path}' (nothing is downloaded: put the benchmark file there)")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(
            f"{what}: no directory at '{path}' (nothing is downloaded: put the benchmark files there)"
        )
    return path


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming file:line."""
    require_file(path, what)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_json(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def read_csv(path: Path, what: str, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every row of a CSV with a header that has every column of ``required``."""
    require_file(path, what)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(
                f"{path}: {what} CSV lacks column(s) {', '.join(missing)} "
                f"(expected {', '.join(required)}; found {', '.join(header) or 'no header'})"
            )
        reader.fieldnames = header
        return [(reader.line_num, {k: (v or "") for k, v in row.items() if k is not None}) for row in reader]


def read_csv_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) for a header-less CSV."""
    require_file(path, what)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]


def field(obj: dict[str, Any], key: str, where: str, types: type | tuple[type, ...] = str) -> Any:
    """``obj[key]``, checked to be present and of ``types``."""
    if key not in obj:
        raise UserError(f"{where}: missing field '{key}'")
    value = obj[key]
    if (
        not isinstance(value, types)
        or isinstance(value, bool)
        and bool not in (types if isinstance(types, tuple) else (types,))
    ):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise UserError(f"{where}: field '{key}' should be {names}, got {type(value).__name__}")
    return value


def letter_index(letter: str, n_options: int, where: str) -> int:
    """The index of an answer letter ('A' -> 0), checked against the number of options."""
    letter = letter.strip().upper()
    idx = ord(letter) - ord("A") if len(letter) == 1 else -1
    if not 0 <= idx < n_options:
        raise UserError(f"{where}: answer '{letter}' is not one of the {n_options} option letters")
    return idx
