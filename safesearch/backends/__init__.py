"""Backends own a live model and answer two kinds of request: greedy generation and log-likelihood.

The merger changes the backend's weights in place between two evaluations; nothing is reloaded.
"""

from safesearch.backends.base import Backend, Prompt, PromptLike, as_prompt

__all__ = ["Backend", "Prompt", "PromptLike", "as_prompt"]
