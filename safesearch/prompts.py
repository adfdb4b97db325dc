"""How questions are put to a model: shared by the toy world's training data and the evaluation suites.

The toy world trains its models on exactly these formats, so that a suite scoring a toy checkpoint asks
it the way it was taught; real checkpoints get the same plain wording through their chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

OPTION_LETTERS = "ABCDEFGHIJ"


def mcq_user_text(question: str, options: Sequence[str]) -> str:
    """The user turn of a multiple-choice question: the stem, then one lettered option a line."""
    if not 2 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"a question needs 2 to {len(OPTION_LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{OPTION_LETTERS[i]}) {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def mcq_answer_text(options: Sequence[str], index: int) -> str:
    """The assistant's answer naming option ``index``: the option's text, then its letter.

    Naming the option (not only its letter) is what lets log-likelihood scoring read the model's
    knowledge rather than its letter preferences.
    """
    return f"The answer is {options[index]} ({OPTION_LETTERS[index]})."
