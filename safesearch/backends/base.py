"""The backend interface that suites, scorers, judges and the search talk to."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class Prompt:
    """A user turn: its text and the images shown with it (before the text).

    ``messages`` replaces the single user turn with a whole conversation of (role, content) pairs, e.g.
    the [user, assistant] exchange a guard model classifies through its own chat template.
    """

    text: str = ""
    images: tuple[Image.Image | Path, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()


# Plain strings stay accepted everywhere: a text-only user turn.
PromptLike = Union[str, Prompt]  # noqa: UP007 (a runtime alias, kept readable on 3.10)

# Early stopping: called with the response generated so far; True once nothing more is needed.
StopRule = Callable[[str], bool]
# Progress: called with the number of requests just finished.
OnBatch = Callable[[int], None]


def as_prompt(p: PromptLike) -> Prompt:
    return p if isinstance(p, Prompt) else Prompt(p)


@runtime_checkable
class Backend(Protocol):
    """A live model behind two batched calls.

    Prompts are user turns (plain text or :class:`Prompt`); the backend renders them with the model's
    chat template. The backend owns the model: the merger changes its weights in place between two
    evaluations and nothing is reloaded.
    """

    @property
    def accepts_images(self) -> bool: ...

    def generate(
        self,
        prompts: Sequence[PromptLike],
        max_new_tokens: int,
        *,
        stop: StopRule | None = None,
        on_batch: OnBatch | None = None,
    ) -> list[str]:
        """Greedy continuations of the assistant turn, one per prompt, without special tokens.
        With ``stop``, a row stops as soon as ``stop(response so far)`` is true."""
        ...

    def loglikelihood(
        self, requests: Sequence[tuple[PromptLike, str]], *, on_batch: OnBatch | None = None
    ) -> list[tuple[float, int]]:
        """For each (user prompt, assistant continuation): the summed log-probability of the
        continuation's tokens and their count."""
        ...
