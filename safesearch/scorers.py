"""Scorers: pure functions from model outputs to per-item outcomes and suite metrics.

MCQ by log-likelihood follows lm-evaluation-harness: ``acc`` picks the option whose continuation has the
highest summed log-probability, ``acc_norm`` divides it by the continuation's length in characters first.
Ties go to the first option, as Python's ``max`` gives them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from safesearch.judges.keyword import normalize
from safesearch.prompts import OPTION_LETTERS


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def pick_options(loglikelihoods: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """(acc choice, acc_norm choice) for one question's options."""
    normed = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, continuations, strict=True)]
    return argmax(loglikelihoods), argmax(normed)


def _letters(n: int) -> str:
    return OPTION_LETTERS[:n]


def parse_choice(response: str, options: Sequence[str]) -> int | None:
    """The option a generated answer names, or None when it names none (or several, ambiguously).

    Tried in order: a parenthesized letter "(B)", "answer is B", a leading "B)" / "B." / "B", and
    finally the text of exactly one option appearing in the answer.
    """
    letters = _letters(len(options))
    text = response.strip()
    for pattern in (
        rf"\(([{letters}])\)",
        rf"answer\s*(?:is|:)?\s*\(?([{letters}])\b",
        rf"^([{letters}])(?:[).:]|\s|$)",
    ):
        m = re.search(pattern, text, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if m:
            return letters.index(m.group(1).upper())
    low = normalize(text)
    hits = [i for i, opt in enumerate(options) if normalize(opt) and normalize(opt) in low]
    return hits[0] if len(hits) == 1 else None


_WORD = re.compile(r"[a-z0-9]+")


def vqa_closed_correct(response: str, gold: str) -> bool:
    """Closed-ended VQA: yes/no gold answers match the first yes/no word of the response; other gold
    answers match when the response starts with them (after normalization)."""
    gold_words = _WORD.findall(gold.lower())
    words = _WORD.findall(response.lower())
    if gold_words in (["yes"], ["no"]):
        first = next((w for w in words if w in ("yes", "no")), None)
        return first == gold_words[0]
    return bool(gold_words) and words[: len(gold_words)] == gold_words


def rate(flags: Sequence[bool | None]) -> float | None:
    """The share of True among the decided flags (None: undecided, left out); None if none is decided."""
    decided = [f for f in flags if f is not None]
    return sum(decided) / len(decided) if decided else None
