"""The in-place merger: ``theta = theta_anchor + sum_v sum_g c[v][g] * tau_v[g]``, one pass over the tensors.

Two layers, so that any backend can run the same merge where its weights live:

* :func:`merge_into` is the arithmetic for one tensor: ``out <- anchor + sum_i c_i * tau_i``, accumulated in
  fp32 through a small scratch buffer that is walked over the tensor in chunks (a chunk stays in cache, so
  the memory traffic is one read of each operand and one write of ``out``, whatever the dtype).
* :class:`Merger` keeps the anchor and the vectors resident on the model's device, keyed by model name, and
  writes merged values into any ``{name: tensor}`` view with ``copy_``: a transformers model's parameters
  (:meth:`Merger.apply`), or a vLLM worker's. :meth:`Merger.iter_merged` yields ``(name, tensor)`` pairs for
  loaders that take an iterator of weights (vLLM's ``load_weights``).

The arithmetic runs as one of two kernels. ``eager`` (the default) is the chunked loop above, plain torch
ops, nothing to compile. ``compiled`` fuses the whole sum into one loop with ``torch.compile`` (a C++ kernel
on CPU, Triton on CUDA; compiled once per number of terms, seconds): one read of each operand and one write,
where the eager loop spends more compute per element than a small CPU has bandwidth to hide (see
``benchmarks/merge.py``). Both accumulate in fp32; they may differ in the last bit (fused multiply-adds),
so a study uses one kernel throughout.

Every merge starts from the resident anchor, so merging A, then B, then A again gives the very bits of a
fresh merge of A. Parameters that no vector touches (frozen ones, or ones the vectors lack) are never
written and have no resident copy: the bound model must hold the anchor's weights, as loaded.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from safesearch.errors import UserError
from safesearch.graftspec import GraftSpec
from safesearch.grouping import Grouping, group_parameters
from safesearch.vectors import Sources, compute_vectors, open_sources

Coefficients = dict[str, dict[str, float]]

# Elements per chunk: the fp32 scratch (4 bytes each) should stay in cache (on CPU: 0.5-2 MB measured
# best by benchmarks/merge.py on a 2-core Xeon, 1.2x faster than 4 MB; the 50 MB L2 of an H100: 16 MB).
# Elementwise arithmetic: the chunk size never changes the result's bits.
DEFAULT_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 22}


def merge_into(
    out: torch.Tensor,
    anchor: torch.Tensor,
    terms: Sequence[tuple[float, torch.Tensor]],
    scratch: torch.Tensor,
) -> None:
    """``out <- anchor + sum c * tau`` over ``terms``, accumulated in fp32 in chunks of ``scratch``'s size.

    All tensors contiguous, of ``out``'s shape; ``scratch`` is a flat fp32 buffer on their device. Zero
    coefficients are skipped. The result depends only on the inputs and the chunk size.
    """
    live = [(float(c), t.reshape(-1)) for c, t in terms if c != 0]
    if not live:
        out.copy_(anchor)
        return
    o, a = out.view(-1), anchor.reshape(-1)
    n, step = o.numel(), scratch.numel()
    for s in range(0, n, step):
        e = min(n, s + step)
        buf = scratch[: e - s]
        buf.copy_(a[s:e])
        for c, t in live:
            buf.add_(t[s:e], alpha=c)
        o[s:e].copy_(buf)


@functools.cache
def compiled_kernel(n_terms: int):
    """``kernel(out, anchor, coefs, *taus)``: ``out <- anchor + sum coefs[i] * taus[i]`` fused, fp32 inside.

    ``coefs`` is a 1-D fp32 tensor on the data's device (values change without recompiling); tensors are
    1-D, any length (compiled with dynamic shapes).
    """

    def kernel(out: torch.Tensor, anchor: torch.Tensor, coefs: torch.Tensor, *taus: torch.Tensor) -> None:
        acc = anchor.float()
        for i in range(n_terms):
            acc = acc + coefs[i] * taus[i].float()
        out.copy_(acc)

    return torch.compile(kernel, dynamic=True, fullgraph=True)


def merged(anchor: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]], chunk: int | None = None) -> torch.Tensor:
    """A new tensor holding :func:`merge_into`'s result (for references and one-off use)."""
    out = torch.empty_like(anchor)
    step = chunk or DEFAULT_CHUNK.get(anchor.device.type, DEFAULT_CHUNK["cuda"])
    merge_into(out, anchor, terms, torch.empty(min(step, max(1, anchor.numel())), dtype=torch.float32, device=anchor.device))
    return out


# -- coefficients ----------------------------------------------------------------------------------------


def parse_coefficients(data: Any, groups: Mapping[str, Sequence[str]], where: str = "coefficients") -> Coefficients:
    """``{vector: {group: number}}`` checked against ``groups`` (vector -> its group names).

    A vector's ``"*"`` entry sets every group it does not name; groups left unset get 0 and so do vectors
    left out. Returns a complete table.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: expected {{vector: {{group: coefficient}}}}, got {type(data).__name__}")
    out: Coefficients = {v: dict.fromkeys(gs, 0.0) for v, gs in groups.items()}
    for v, per_group in data.items():
        if v not in groups:
            raise UserError(f"{where}: unknown vector {v!r} (the spec has {', '.join(groups)})")
        if not isinstance(per_group, Mapping):
            raise UserError(f"{where}: {v}: expected {{group: coefficient}}, got {per_group!r:.60}")
        if "*" in per_group:
            out[v] = dict.fromkeys(groups[v], _coefficient(per_group["*"], f"{where}: {v}.*"))
        for g, c in per_group.items():
            if g == "*":
                continue
            if g not in out[v]:
                shown = ", ".join(list(groups[v])[:8]) + (", ..." if len(groups[v]) > 8 else "")
                raise UserError(f"{where}: {v}: unknown group {g!r} (groups: {shown})")
            out[v][g] = _coefficient(c, f"{where}: {v}.{g}")
    return out


def load_coefficients(path: str | Path, groups: Mapping[str, Sequence[str]]) -> Coefficients:
    from safesearch.textfiles import read_json

    path = Path(path)
    return parse_coefficients(read_json(path, "coefficient file"), groups, where=f"coefficient file {path}")


def _coefficient(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: coefficient {value!r} is not a finite number")
    return float(value)


# -- the merger ------------------------------------------------------------------------------------------


class Merger:
    """Resident anchor and vectors for the parameters the vectors touch; merges them into a live model.

    Build it with :meth:`from_spec`. ``anchor``: model name -> tensor; ``vectors``: vector -> model name ->
    tensor of the same shape, dtype and device; ``grouping`` places each name in a group.
    """

    def __init__(
        self,
        anchor: dict[str, torch.Tensor],
        vectors: dict[str, dict[str, torch.Tensor]],
        grouping: Grouping,
        chunk: int | None = None,
        sources: Sources | None = None,
        kernel: str = "eager",
    ) -> None:
        if kernel not in ("eager", "compiled"):
            raise UserError(f"merge kernel {kernel!r} is not eager or compiled")
        self.kernel = kernel
        self.anchor = anchor
        self.vectors = vectors
        self.grouping = grouping
        self.sources = sources
        self._group_of = grouping.group_of
        first = next(iter(anchor.values()), None)
        self.dtype = first.dtype if first is not None else torch.float32
        self.device = first.device if first is not None else torch.device("cpu")
        for name, t in anchor.items():
            if name not in self._group_of:
                raise ValueError(f"anchor tensor {name!r} is in no group")
            if t.dtype != self.dtype or t.device != self.device or not t.is_contiguous():
                raise ValueError(f"anchor tensor {name!r}: {t.dtype} on {t.device}, expected contiguous {self.dtype} on {self.device}")
        for v, tensors in vectors.items():
            for name, t in tensors.items():
                a = anchor.get(name)
                if a is None or t.shape != a.shape or t.dtype != self.dtype or t.device != self.device:
                    raise ValueError(f"vector {v}: tensor {name!r} does not match the resident anchor")
        step = chunk or DEFAULT_CHUNK.get(self.device.type, DEFAULT_CHUNK["cuda"])
        largest = max((t.numel() for t in anchor.values()), default=1)
        self.scratch = torch.empty(min(step, largest), dtype=torch.float32, device=self.device)

    @classmethod
    def from_spec(
        cls,
        spec: GraftSpec,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk: int | None = None,
        sources: Sources | None = None,
        kernel: str = "eager",
    ) -> Merger:
        """Open the spec's checkpoints, group the anchor's parameters, load the anchor and compute the vectors.

        ``device`` and ``dtype`` default to the spec's (``auto``: CUDA when present; the anchor's dtype);
        ``sources`` reuses checkpoints already opened with :func:`~safesearch.vectors.open_sources`;
        ``kernel`` is ``eager`` or ``compiled`` (see the module docstring).
        """
        sources = sources or open_sources(spec)
        params = sources.anchor.layout.parameters
        grouping = group_parameters(params, spec.groups)
        dev = torch.device(device) if device is not None else spec.torch_device()
        dt = dtype or spec.torch_dtype(anchor_dtype(sources))
        placed = grouping.group_of
        covered = {n for v in spec.vectors for n in sources.mapped[spec.vectors[v].plus] if n in params}
        touched = [n for n in params if n in placed and n in covered]
        anchor = {n: sources.load(spec.anchor, n, dev).to(dt).contiguous() for n in touched}
        vectors = compute_vectors(sources, touched, dt, dev)
        return cls(anchor, vectors, grouping, chunk=chunk, sources=sources, kernel=kernel)

    # -- what it merges ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Model names the merger writes (in the model's order)."""
        return list(self.anchor)

    @property
    def vector_names(self) -> list[str]:
        return list(self.vectors)

    def groups(self) -> dict[str, list[str]]:
        """Vector -> every group name (what a coefficient table is checked against)."""
        return {v: list(self.grouping.groups) for v in self.vectors}

    def active_groups(self) -> dict[str, list[str]]:
        """Vector -> the groups where it has at least one tensor (the coefficients worth searching)."""
        out: dict[str, list[str]] = {}
        for v, tensors in self.vectors.items():
            hit = {self._group_of[n] for n in tensors}
            out[v] = [g for g in self.grouping.groups if g in hit]
        return out

    def parse(self, data: Any, where: str = "coefficients") -> Coefficients:
        return parse_coefficients(data, self.groups(), where)

    def check_bounds(self, bounds: Coefficients, where: str, prefix: str = "") -> None:
        """Refuse coefficients whose merge could leave the working dtype's range (inf weights).

        ``bounds``: vector -> group -> the largest magnitude its coefficient takes (a table, or the ends
        of a search range). Per group, ``max|anchor| + sum_v bound[v] * max|tau_v|`` must stay within the
        dtype's largest finite value: a sufficient condition, checked on the resident tensors once.
        The error names ``where`` (a file) and the field: ``prefix`` (``search.``), vector and group.
        """
        limit = torch.finfo(self.dtype).max
        anchor_max, vector_max = self._magnitudes
        for g, a in anchor_max.items():
            total = a
            for v in self.vectors:
                c = abs(bounds.get(v, {}).get(g, 0.0))
                total += c * vector_max.get(v, {}).get(g, 0.0)
                if c > limit or total > limit:
                    raise UserError(
                        f"{where}: {prefix}{v}.{g}: a coefficient of {c:g} takes the merged weights to about {total:.3g}, "
                        f"beyond the largest {str(self.dtype).removeprefix('torch.')} value ({limit:.3g})"
                    )

    @functools.cached_property
    def _magnitudes(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(group -> max |anchor|, vector -> group -> max |tau|) over the resident tensors."""

        def peak(t: torch.Tensor) -> float:
            if t.numel() == 0:
                return 0.0
            lo, hi = torch.aminmax(t)  # no |t| copy of a large tensor
            return max(-float(lo), float(hi))

        anchor: dict[str, float] = {}
        for name, t in self.anchor.items():
            g = self._group_of[name]
            anchor[g] = max(anchor.get(g, 0.0), peak(t))
        vectors: dict[str, dict[str, float]] = {}
        for v, tensors in self.vectors.items():
            per = vectors.setdefault(v, {})
            for name, t in tensors.items():
                g = self._group_of[name]
                per[g] = max(per.get(g, 0.0), peak(t))
        return anchor, vectors

    def resident_bytes(self) -> int:
        tensors = [*self.anchor.values(), *(t for vec in self.vectors.values() for t in vec.values()), self.scratch]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- merging -------------------------------------------------------------------------------------

    def _write(self, name: str, out: torch.Tensor, coefs: Coefficients, cache: dict) -> None:
        """Merge ``name`` into ``out`` with the merger's kernel; ``cache`` holds one merge's coefficient tensors."""
        g = self._group_of[name]
        live = [
            (i, c, t[name])
            for i, (v, t) in enumerate(self.vectors.items())
            if name in t and (c := coefs.get(v, {}).get(g, 0.0)) != 0
        ]
        a = self.anchor[name]
        if self.kernel == "eager" or not live:
            merge_into(out, a, [(c, t) for _, c, t in live], self.scratch)
            return
        key = (g, tuple(i for i, _, _ in live))
        if key not in cache:
            cache[key] = torch.tensor([c for _, c, _ in live], dtype=torch.float32, device=self.device)
        compiled_kernel(len(live))(out.view(-1), a.view(-1), cache[key], *(t.view(-1) for _, _, t in live))

    @torch.no_grad()
    def merge_into(self, params: Mapping[str, torch.Tensor], coefs: Coefficients) -> None:
        """Write the merged value of every name the merger holds into ``params[name]``, in place."""
        cache: dict = {}
        for name in self.anchor:
            self._write(name, params[name], coefs, cache)

    @torch.no_grad()
    def merge_one(self, name: str, coefs: Coefficients, out: torch.Tensor) -> torch.Tensor:
        """Write the merged value of ``name`` into ``out`` (its shape, dtype and device) and return it."""
        self._write(name, out, coefs, {})
        return out

    def iter_merged(self, coefs: Coefficients) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor)`` for every name the merger holds.

        Each tensor is a view of one buffer the size of the largest tensor, overwritten by the next one:
        consume (copy or write) it before advancing.
        """
        largest = max((t.numel() for t in self.anchor.values()), default=0)
        flat = torch.empty(largest, dtype=self.dtype, device=self.device)
        cache: dict = {}
        with torch.no_grad():
            for name, a in self.anchor.items():
                out = flat[: a.numel()].view(a.shape)
                self._write(name, out, coefs, cache)
                yield name, out

    def bind(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters the merger writes, checked for name, shape, dtype and device."""
        params = dict(model.named_parameters())
        if self.sources is not None:
            layout = self.sources.anchor.layout
            extra = [n for n in params if n not in layout.parameters]
            if extra:
                raise UserError(
                    f"architecture mismatch: the model ({type(model).__name__}) has parameter {extra[0]!r}, "
                    f"which the anchor ({layout.architecture}) lacks"
                )
        bound: dict[str, torch.Tensor] = {}
        for name, a in self.anchor.items():
            p = params.get(name)
            if p is None:
                raise UserError(f"the model has no parameter {name!r}: is it the anchor's architecture?")
            if p.shape != a.shape or p.dtype != a.dtype or p.device != a.device:
                raise UserError(
                    f"model parameter {name!r} is {list(p.shape)} {p.dtype} on {p.device}; "
                    f"the merger holds {list(a.shape)} {a.dtype} on {a.device}"
                )
            bound[name] = p.data
        return bound

    def apply(self, model: torch.nn.Module, coefs: Coefficients) -> None:
        """Set ``model``'s parameters to the merge for ``coefs``, in place (no reallocation)."""
        self.merge_into(self.bind(model), coefs)


def anchor_dtype(sources: Sources) -> torch.dtype:
    """The anchor's floating dtype (the most common one among its parameters)."""
    counts = Counter(info.dtype for _, info in sources.mapped[sources.spec.anchor].values() if info.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32
