"""The generic JSONL format: the toy world's schema, one item a line.

Required keys: ``id`` (unique), ``text``, ``kind`` (harmful | benign | mcq | vqa). Optional: ``domain``,
``category``, ``split``, ``options`` + ``answer`` (mcq: a list of strings and an index into it),
``image`` (a path, relative to the file's directory) + ``answer_text`` (vqa). Unknown keys are kept in
``meta`` and otherwise ignored. A null optional key counts as absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesearch.datasets._io import (
    UniqueIds,
    check_string,
    field,
    image_file,
    optional_field,
    read_jsonl,
    text_field,
)
from safesearch.datasets.items import Item
from safesearch.errors import UserError

_KNOWN = {"id", "text", "kind", "domain", "category", "split", "options", "answer", "image", "answer_text"}
KINDS = ("harmful", "benign", "mcq", "vqa")


def read_jsonl_items(path: Path) -> list[Item]:
    items: list[Item] = []
    ids = UniqueIds()
    images: set[Path] = set()
    for lineno, obj in read_jsonl(path, "JSONL dataset"):
        where = f"{path}:{lineno}"
        item_id = ids.add(str(field(obj, "id", where, (str, int))), where, f"line {lineno}")
        kind = field(obj, "kind", where)
        if kind not in KINDS:
            raise UserError(f"{where}: kind '{kind}' is not one of {', '.join(KINDS)}")
        options, answer = _mcq(obj, where) if kind == "mcq" else (None, None)
        image = _image(obj, path, where, images)
        answer_text = optional_field(obj, "answer_text", where, None)
        if kind == "vqa" and (image is None or answer_text is None):
            raise UserError(f"{where}: a vqa item needs 'image' and 'answer_text'")
        items.append(
            Item(
                id=item_id,
                text=text_field(obj, "text", where),
                kind=kind,
                domain=optional_field(obj, "domain", where, "general"),
                category=optional_field(obj, "category", where, ""),
                split=optional_field(obj, "split", where, ""),
                options=options,
                answer=answer,
                image=image,
                answer_text=answer_text,
                meta={k: v for k, v in obj.items() if k not in _KNOWN},
            )
        )
    return items


def _mcq(obj: dict[str, Any], where: str) -> tuple[tuple[str, ...], int]:
    options = tuple(field(obj, "options", where, list))
    if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise UserError(f"{where}: 'options' should be a list of at least two non-empty strings")
    for o in options:
        check_string(o, "an option", where)
    answer = field(obj, "answer", where, int)
    if not 0 <= answer < len(options):
        raise UserError(f"{where}: answer {answer} is not an index into its {len(options)} options")
    return options, answer


def _image(obj: dict[str, Any], path: Path, where: str, checked: set[Path]) -> Path | None:
    name = optional_field(obj, "image", where, None)
    if name is None:
        return None
    if not name.strip():
        raise UserError(f"{where}: field 'image' is empty")
    if "\0" in name:
        raise UserError(f"{where}: field 'image' holds a NUL character")
    return image_file((path.parent / name).resolve(), where, checked)
