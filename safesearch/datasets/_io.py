"""File access shared by the readers: every failure names the file (and line) and what was expected.

Every byte goes through :mod:`safesearch.textfiles` (strict UTF-8, a byte-order mark dropped), so that a
file exported by a spreadsheet reads like one written by a script, and a file in another encoding is
named by line instead of failing with a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safesearch import textfiles
from safesearch.errors import UserError
from safesearch.textfiles import parse_json


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a UserError saying where we looked and what belongs there."""
    if path.is_dir():
        raise UserError(f"{what}: '{path}' is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{what}: no file at '{path}' (nothing is downloaded: put the benchmark file there)")
    return path


def require_dir(path: Path, what: str) -> Path:
    if path.is_file():
        raise UserError(f"{what}: '{path}' is a file, not a directory")
    if not path.is_dir():
        raise UserError(
            f"{what}: no directory at '{path}' (nothing is downloaded: put the benchmark files there)"
        )
    return path


def read_text(path: Path, what: str) -> str:
    """The file as text. A NUL character is refused: no benchmark has one, but a UTF-16 file without a
    byte-order mark decodes as "UTF-8" with a NUL after every ASCII letter."""
    text = textfiles.read_text(require_file(path, what), what)
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise UserError(f"{what} {path}:{line}: holds a NUL character (UTF-16? save the file as UTF-8)")
    return text


def benchmark_files(path: Path, pattern: str, what: str) -> list[Path]:
    """``path`` if it is a file, else the files under it matching ``pattern`` (recursively, sorted): the
    benchmarks published as one file per category or scenario take either."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{what}: nothing at '{path}' (expected a {pattern} file or a directory of them)")
    files = sorted(path.rglob(pattern))
    if not files:
        raise UserError(f"{what}: no {pattern} files under '{path}'")
    return files


# -- JSON ----------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> Any:
    """The file as one JSON value (see :func:`safesearch.textfiles.parse_json`)."""
    return textfiles.read_json(require_file(path, what), what)


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for every non-blank line. Lines end at \\n, \\r\\n or \\r only: U+2028 and
    the other separators that ``str.splitlines`` also cuts at may stand raw inside a JSON string."""
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        if line.strip():
            yield lineno, line.rstrip("\r\n")


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming file:line, and
    so is a file without a single record."""
    lines = list(jsonl_lines(read_text(path, what)))
    if not lines:
        raise UserError(f"{path}: {what} has no records (the file is empty or blank)")
    for lineno, line in lines:
        obj = parse_json(line, path, lineno, "JSON line")
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {json_type(obj)}")
        yield lineno, obj


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages a user who wrote the JSON can read."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# -- CSV -----------------------------------------------------------------------------------------


def _csv_records(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) for every non-blank record. Strict: an unclosed quote or text after a closing
    quote is an error, not a silently merged field; so is a field over the csv module's size limit (almost
    always an unclosed quote swallowing the rest of the file), which is not raised."""
    reader = csv.reader(io.StringIO(read_text(path, what), newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}:{start}: {what} CSV: {_csv_problem(e)}") from None
        if any(c.strip() for c in row):
            yield start, row


def _csv_problem(e: csv.Error) -> str:
    if "field larger than field limit" in str(e):
        return (
            f"a field is longer than {csv.field_size_limit()} characters "
            "(an unclosed quote? a file that is not CSV?)"
        )
    if "unexpected end of data" in str(e):
        return "a quoted field is never closed"
    return f"malformed CSV ({e})"


def read_csv(
    path: Path, what: str, required: Sequence[str], optional: Sequence[str] = ()
) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every row of a CSV with a header that has every column of ``required``.

    A row with fewer cells than the header is refused (a cell went missing, so the others may have moved),
    and so is one with more, unless the extra cells are blank (trailing commas). A file without rows is
    refused: an empty benchmark is a broken download, not a benchmark.
    """
    records = _csv_records(path, what)
    first = next(records, None)
    if first is None:
        raise UserError(f"{path}: {what} CSV is empty (expected a header with {', '.join(required)})")
    header_line, cells = first
    header = [h.strip() for h in cells]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(
            f"{path}: {what} CSV lacks column(s) {', '.join(missing)} "
            f"(expected {', '.join(required)}; found {', '.join(header) or 'no header'})"
        )
    twice = [c for c in (*required, *optional) if header.count(c) > 1]
    if twice:
        raise UserError(f"{path}:{header_line}: {what} CSV has column '{twice[0]}' more than once")
    rows = []
    for lineno, row in records:
        if len(row) < len(header) or any(c.strip() for c in row[len(header) :]):
            raise UserError(
                f"{path}:{lineno}: {what} CSV row has {len(row)} cells, the header {len(header)} "
                "(a missing cell, or an unquoted comma?)"
            )
        rows.append((lineno, dict(zip(header, row, strict=False))))
    if not rows:
        raise UserError(f"{path}: {what} CSV has a header but no rows")
    return rows


def read_csv_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) for a header-less CSV; blank lines are skipped, a file of none is refused."""
    rows = list(_csv_records(path, what))
    if not rows:
        raise UserError(f"{path}: {what} CSV has no rows (the file is empty or blank)")
    return rows


def cell(row: dict[str, str], key: str, where: str) -> str:
    """A required text cell, stripped; a blank one is refused rather than read as an empty prompt."""
    value = row[key].strip()
    if not value:
        raise UserError(f"{where}: column '{key}' is empty")
    return value


# -- fields --------------------------------------------------------------------------------------


def field(obj: dict[str, Any], key: str, where: str, types: type | tuple[type, ...] = str) -> Any:
    """``obj[key]``, checked to be present and of ``types`` (a bool is no int unless bool is listed)."""
    if key not in obj:
        raise UserError(f"{where}: missing field '{key}'")
    return _checked(obj[key], key, where, types)


def optional_field(
    obj: dict[str, Any], key: str, where: str, default: Any, types: type | tuple[type, ...] = str
) -> Any:
    """``obj[key]`` if present and not null (null is how many exports write "absent"), else ``default``."""
    value = obj.get(key)
    return default if value is None else _checked(value, key, where, types)


def text_field(obj: dict[str, Any], key: str, where: str) -> str:
    """A required string that is not blank: an empty prompt or question is a broken record."""
    value = field(obj, key, where)
    if not value.strip():
        raise UserError(f"{where}: field '{key}' is empty")
    return value


def _checked(value: Any, key: str, where: str, types: type | tuple[type, ...]) -> Any:
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise UserError(f"{where}: field '{key}' should be {_names(allowed)}, got {json_type(value)}")
    if isinstance(value, str):
        check_string(value, f"field '{key}'", where)
    return value


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    tuple: "a list",
    dict: "an object",
    bool: "true or false",
}


def _names(types: tuple[type, ...]) -> str:
    """``(str, int, float)`` -> "a string or a number": a float slot takes integers too."""
    shown = [t for t in types if not (t is int and float in types)]
    return " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in shown))


def check_string(value: str, name: str, where: str) -> str:
    """``value``, refused if it holds a lone surrogate (JSON's \\ud800 escapes decode to one): such a string
    cannot be encoded, so it would fail later, in a tokenizer, far from the file that holds it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: {name} holds an invalid \\u escape (a lone surrogate)") from None
    return value


def letter_index(letter: str, n_options: int, where: str) -> int:
    """The index of an answer letter ('A' -> 0), checked against the number of options."""
    letter = letter.strip().upper()
    idx = ord(letter) - ord("A") if len(letter) == 1 else -1
    if not 0 <= idx < n_options:
        raise UserError(f"{where}: answer '{letter}' is not one of the {n_options} option letters")
    return idx


class UniqueIds:
    """Item ids seen so far: seeded subsets and per-item results are keyed by id, so two items under one
    id would silently share a rank and a result."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}

    def add(self, item_id: str, where: str, label: str) -> str:
        """``item_id``, refused at ``where`` if seen before; ``label`` ("line 3") says where it was seen."""
        if item_id in self._first:
            raise UserError(f"{where}: duplicate id '{item_id}' (first on {self._first[item_id]})")
        self._first[item_id] = label
        return item_id


class ContentIds:
    """Ids for records a benchmark publishes without one: ``<prefix>-<hash of the content>``, so that an
    item keeps its id (and with it its split and its place in a seeded subset) when the file is re-ordered
    or rows are added, and two files of one benchmark (a dev and a test file) never share an id by line
    number. An exact duplicate takes its twin's id with ``.2``, ``.3``... in order of appearance."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._seen: Counter[str] = Counter()

    def make(self, *content: str) -> str:
        digest = hashlib.sha256("\x1f".join(content).encode()).hexdigest()[:12]
        base = f"{self.prefix}-{digest}"
        self._seen[base] += 1
        n = self._seen[base]
        return base if n == 1 else f"{base}.{n}"


# -- images --------------------------------------------------------------------------------------


def image_file(path: Path, where: str, checked: set[Path] | None = None) -> Path:
    """``path`` if it is an image file PIL can open. Only the header is parsed (no pixels decoded, to stay
    cheap), so an image cut short after its header still passes; ``checked`` holds the images already
    passed (benchmarks ask many questions about one image)."""
    if checked is not None and path in checked:
        return path
    if "\0" in str(path):
        raise UserError(f"{where}: image path '{path!s:.200}' holds a NUL character")
    if path.is_dir():
        raise UserError(f"{where}: image '{path}' is a directory, not an image file")
    if not path.is_file():
        raise UserError(f"{where}: image '{path}' does not exist")
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Image.UnidentifiedImageError:
        raise UserError(f"{where}: image '{path}' is not an image (PIL cannot identify it)") from None
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where}: image '{path}' cannot be read ({detail})") from None
    if checked is not None:
        checked.add(path)
    return path


# -- reader options ------------------------------------------------------------------------------


def option(fmt: str, name: str, value: Any, types: type | tuple[type, ...]) -> Any:
    """A reader option from a suite file, checked: a string where a flag belongs is truthy, and would
    otherwise be read as True without a word."""
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise UserError(f"{fmt}: option {name} should be {_names(allowed)}, got {value!r:.80}")
    return value
