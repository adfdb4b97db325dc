"""The generic JSONL format: the toy world's schema, one item a line.

Required keys: ``id`` (unique), ``text``, ``kind`` (harmful | benign | mcq | vqa). Optional: ``domain``,
``category``, ``split``, ``options`` + ``answer`` (mcq: a list of strings and an index into it),
``image`` (a path, relative to the file's directory) + ``answer_text`` (vqa). Unknown keys are kept in
``meta`` and otherwise ignored.
"""

from __future__ import annotations

from pathlib import Path

from safesearch.datasets._io import field, read_jsonl
from safesearch.datasets.items import Item
from safesearch.errors import UserError

_KNOWN = {"id", "text", "kind", "domain", "category", "split", "options", "answer", "image", "answer_text"}
KINDS = ("harmful", "benign", "mcq", "vqa")


def read_jsonl_items(path: Path) -> list[Item]:
    items: list[Item] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path, "JSONL dataset"):
        where = f"{path}:{lineno}"
        item_id = field(obj, "id", where, (str, int))
        item_id = str(item_id)
        if item_id in seen:
            raise UserError(f"{where}: duplicate id '{item_id}' (first on line {seen[item_id]})")
        seen[item_id] = lineno
        kind = field(obj, "kind", where)
        if kind not in KINDS:
            raise UserError(f"{where}: kind '{kind}' is not one of {', '.join(KINDS)}")
        options = answer = None
        if kind == "mcq":
            options = tuple(field(obj, "options", where, list))
            if len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise UserError(f"{where}: 'options' should be a list of at least two strings")
            answer = field(obj, "answer", where, int)
            if not 0 <= answer < len(options):
                raise UserError(f"{where}: answer {answer} is not an index into its {len(options)} options")
        image = None
        if "image" in obj:
            image = (path.parent / field(obj, "image", where)).resolve()
            if not image.is_file():
                raise UserError(f"{where}: image '{image}' does not exist")
        answer_text = obj.get("answer_text")
        if kind == "vqa" and (image is None or not isinstance(answer_text, str)):
            raise UserError(f"{where}: a vqa item needs 'image' and 'answer_text'")
        items.append(
            Item(
                id=item_id,
                text=field(obj, "text", where),
                kind=kind,
                domain=str(obj.get("domain", "general")),
                category=str(obj.get("category", "")),
                split=str(obj.get("split", "")),
                options=options,
                answer=answer,
                image=image,
                answer_text=answer_text,
                meta={k: v for k, v in obj.items() if k not in _KNOWN},
            )
        )
    return items
