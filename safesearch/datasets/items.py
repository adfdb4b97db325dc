"""The one record every reader produces: an evaluation item, whatever format it was published in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["harmful", "benign", "mcq", "vqa"]


@dataclass(frozen=True)
class Item:
    """One question put to a model.

    ``text`` is the user turn (for an MCQ, the stem without its options); ``options``/``answer`` are set
    for multiple-choice items, ``image``/``answer_text`` for visual questions. ``meta`` keeps whatever else
    the source file said (categories, labels), so that reports can break results down.
    """

    id: str
    text: str
    kind: Kind
    domain: str = "general"
    category: str = ""
    split: str = ""
    options: tuple[str, ...] | None = None
    answer: int | None = None
    image: Path | None = None
    answer_text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
