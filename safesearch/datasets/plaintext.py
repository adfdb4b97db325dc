"""Plain prompt files: one prompt a line, as behaviour lists are often shared (HarmBench's behaviours, a
team's own red-team prompts, XSTest's safe prompts pasted from a paper).

The file says nothing but the prompts, so the suite says the rest, as reader options: ``kind`` (harmful or
benign: a plain line cannot carry an MCQ's options), ``category`` and ``domain`` (given to every item).
Blank lines are skipped; every other line, stripped of surrounding white space, is one prompt. Ids are
``<file stem>-<hash of the prompt>`` (:class:`~safesearch.datasets._io.ContentIds`), so that a prompt keeps
its id, and with it its split, when lines are added or re-ordered.
"""

from __future__ import annotations

from pathlib import Path

from safesearch.datasets._io import ContentIds, check_string, jsonl_lines, option, read_text
from safesearch.datasets.items import Item
from safesearch.errors import UserError

TEXT_KINDS = ("harmful", "benign")


def read_text_items(path: Path, *, kind: str = "harmful", category: str = "", domain: str = "general") -> list[Item]:
    what = "prompt file"
    for name, value in (("kind", kind), ("category", category), ("domain", domain)):
        option("text", name, value, str)
    if kind not in TEXT_KINDS:
        raise UserError(f"text: option kind '{kind}' is not one of {', '.join(TEXT_KINDS)} (a plain line cannot "
                        "carry an MCQ's options)")
    ids = ContentIds(path.stem)
    items = []
    # jsonl_lines: lines end at \n, \r\n or \r only, and blank ones are skipped
    for lineno, line in jsonl_lines(read_text(path, what)):
        text = check_string(line.strip(), "the prompt", f"{path}:{lineno}")
        items.append(Item(id=ids.make(text), text=text, kind=kind, domain=domain or "general", category=category))
    if not items:
        raise UserError(f"{path}: {what} has no prompts (the file is empty or blank)")
    return items
