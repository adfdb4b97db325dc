"""The merge of a spec computed piece by piece from the checkpoints, for an export that merges once.

:class:`~safesearch.merging.Merger` keeps the anchor and every vector resident, which a search needs (it
merges hundreds of times) and an export does not: it would read the whole model three times into memory
before writing the first byte. :class:`StreamingMerger` holds nothing: :meth:`StreamingMerger.load` reads
what one piece of one parameter needs, and :meth:`StreamingMerger.merge_loaded` merges it with a one-tensor
:class:`~safesearch.merging.Merger`: the same arithmetic, the same kernel, so the very bits the resident
merger gives. A piece (:meth:`StreamingMerger.parts`) is a range of a few MB when the merge is elementwise
(plain differences, the eager kernel on the CPU: the common case), else the whole tensor, whose vectors come
from :func:`~safesearch.vectors.compute_vectors` (Gram-Schmidt, trimming and DARE included).
:func:`~safesearch.export.export_merged` calls ``load`` on a read-ahead thread.

:meth:`StreamingMerger.check_bounds` checks the coefficients alone (the resident merger's check also reads
every tensor's magnitude, a pass over the model); the export's check that every merged tensor is finite
refuses coefficients that overflow all the same, naming the tensor, and writes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from safesearch.errors import UserError
from safesearch.graftspec import GraftSpec
from safesearch.grouping import Grouping
from safesearch.merging import DEFAULT_CHUNK, Coefficients, Merger, parse_coefficients, plan_merge
from safesearch.vectors import Sources, compute_vectors, difference, open_sources

Loaded = tuple[torch.Tensor, dict[str, torch.Tensor]]
# Merge chunks per streamed range: 4 x 2^18 elements, 4 MB of fp32 per operand, a few of them in flight.
SPAN_CHUNKS = 4


class StreamingMerger:
    """The names, groups and dtype of :meth:`Merger.from_spec`'s merger, with nothing loaded."""

    def __init__(
        self,
        sources: Sources,
        grouping: Grouping,
        names: list[str],
        dtype: torch.dtype,
        device: torch.device,
        chunk: int | None = None,
        kernel: str = "eager",
    ) -> None:
        self.sources = sources
        self.grouping = grouping
        self.names = names
        self.dtype = dtype
        self.device = device
        self.chunk = chunk
        self.kernel = kernel
        self.vector_names = list(sources.spec.vectors)

    @classmethod
    def from_spec(
        cls,
        spec: GraftSpec,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk: int | None = None,
        sources: Sources | None = None,
        kernel: str = "eager",
    ) -> StreamingMerger:
        """As :meth:`Merger.from_spec` (the same arguments, the same names merged), reading headers only.

        ``kernel`` defaults to ``eager``: a one-off merge should not wait seconds for a compiler, and only the
        eager kernel streams in ranges; a study's export passes the study's kernel.
        """
        sources = sources or open_sources(spec)
        grouping, names, dev, dt = plan_merge(spec, sources, device, dtype)
        return cls(sources, grouping, names, dt, dev, chunk=chunk, kernel=kernel)

    def groups(self) -> dict[str, list[str]]:
        """Vector -> every group name (what a coefficient table is checked against)."""
        return {v: list(self.grouping.groups) for v in self.vector_names}

    def parse(self, data: Any, where: str = "coefficients") -> Coefficients:
        return parse_coefficients(data, self.groups(), where)

    def check_bounds(self, bounds: Coefficients, where: str, prefix: str = "") -> None:
        """Refuse a coefficient beyond the working dtype's range, as :meth:`Merger.check_bounds` words it.

        Only the coefficients: the weights' magnitudes would take a pass over every tensor. A merge that
        overflows all the same is refused by the export's finiteness check, which names the tensor.
        """
        limit = torch.finfo(self.dtype).max
        for v, per_group in bounds.items():
            for g, c in per_group.items():
                if abs(c) > limit:
                    raise UserError(
                        f"{where}: {prefix}{v}.{g}: a coefficient of {abs(c):g} is beyond the largest "
                        f"{str(self.dtype).removeprefix('torch.')} value ({limit:.3g})"
                    )

    def parts(self, name: str) -> list[slice | None]:
        """The pieces :meth:`load` reads ``name`` in: ``[None]`` (the whole tensor at once) or element ranges.

        A merge that is elementwise in its inputs (on the CPU with the eager kernel, every vector a plain
        difference of tensors of the anchor's shape) is streamed in ranges of a few MB: small buffers that
        stay in cache and are reused, instead of whole-tensor copies. The ranges are whole multiples of the
        merge's chunk, so the merge runs the very operations on the very elements the resident merger does.
        Gram-Schmidt, trimming, DARE (they need the whole tensor), vocabulary rows that differ and other
        devices or kernels read the whole tensor.
        """
        if self.device.type != "cpu" or self.kernel != "eager":
            return [None]
        shape = self.sources.anchor.layout.parameters[name]
        numel = math.prod(shape)
        if not shape or numel == 0:
            return [None]
        spec = self.sources.spec
        for v in self.vector_names:
            vs = spec.vectors[v]
            if name not in self.sources.names_of(v):
                continue
            if vs.orthogonalize is not None or vs.trim is not None or vs.dare is not None:
                return [None]
            if any(self.sources.mapped[c][name][1].shape != shape for c in (vs.plus, vs.minus)):
                return [None]
        span = (self.chunk or DEFAULT_CHUNK["cpu"]) * SPAN_CHUNKS
        return [slice(s, min(s + span, numel)) for s in range(0, numel, span)]

    def load(self, name: str, part: slice | None = None) -> Loaded:
        """``name``'s anchor tensor and its vectors (those that have it), as :meth:`Merger.from_spec` holds them;
        for a ``part`` of :meth:`parts`, those elements of them, flat."""
        if part is not None:
            return self._load_part(name, part)
        sources = _Remembering(**{f.name: getattr(self.sources, f.name) for f in fields(Sources)})
        vectors = compute_vectors(sources, [name], self.dtype, self.device)
        # The anchor is often a vector's endpoint (medical - aligned, anchor medical): read once, not twice.
        anchor = sources.load(sources.spec.anchor, name, self.device).to(self.dtype).contiguous()
        return anchor, {v: t[name] for v, t in vectors.items() if name in t}

    def _load_part(self, name: str, part: slice) -> Loaded:
        """Elements ``part`` of the anchor and the vectors: what :func:`compute_vectors` computes for plain
        differences (:func:`difference`, then the working dtype), elementwise, so on a range as on the whole."""
        read: dict[str, torch.Tensor] = {}

        def flat(ckpt: str) -> torch.Tensor:
            if ckpt not in read:
                key = self.sources.mapped[ckpt][name][1].key
                read[ckpt] = self.sources.checkpoints[ckpt].load_flat(key, part.start, part.stop)
            return read[ckpt]

        n = part.stop - part.start
        taus = {}
        for v in self.vector_names:
            if name in self.sources.names_of(v):
                vs = self.sources.spec.vectors[v]
                taus[v] = difference(flat(vs.plus), flat(vs.minus), n).to(self.dtype)
        return flat(self.sources.spec.anchor).to(self.dtype).contiguous(), taus

    @torch.no_grad()
    def merge_loaded(self, name: str, loaded: Loaded, coefs: Coefficients, out: torch.Tensor) -> torch.Tensor:
        """Write the merge of ``name`` (or of a part: ``out`` is then those elements) from what :meth:`load`
        gave into ``out`` and return it."""
        anchor, taus = loaded
        # The vectors in the spec's order, as the resident merger sums them: the same terms, the same bits.
        vectors = {v: ({name: taus[v]} if v in taus else {}) for v in self.vector_names}
        one = Merger({name: anchor}, vectors, self.grouping, chunk=self.chunk, kernel=self.kernel)
        return one.merge_one(name, coefs, out)

@dataclass
class _Remembering(Sources):
    """Sources that keep what they read, for one name: its anchor tensor is read once even when it is also
    a vector's endpoint."""

    read: dict[str, torch.Tensor] = field(default_factory=dict)

    def load(self, ckpt: str, name: str, device: torch.device) -> torch.Tensor:
        if ckpt not in self.read:
            self.read[ckpt] = super().load(ckpt, name, device)
        return self.read[ckpt]
