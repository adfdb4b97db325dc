"""Task vectors: ``tau = A - B`` per tensor, aligned to the anchor's names and shapes, then shaped.

Per tensor, in this order: the difference (in fp32); Gram-Schmidt against another vector
(``tau - <tau, tau_o> / <tau_o, tau_o> * tau_o``, the paper's separation of safety from medical knowledge,
against the other vector as it is stored, i.e. as it is added); TIES-style trimming to the largest
magnitudes; DARE (drop with probability p, rescale by 1/(1-p), seeded per vector and tensor so that any
order of computation draws the same mask). The result is stored in the working dtype.

Names: each checkpoint's model names go through its ``prefix_map`` into the anchor's names. A vector's two
checkpoints must share their architecture and their parameters; each of their parameters must exist in the
anchor (a tied alias such as ``lm_head.weight`` of a tied anchor is dropped: the anchor has no such
parameter). Anchor parameters a vector lacks get no delta from it.

Vocabulary rows: embedding and head matrices (``embed_tokens``, ``lm_head``, ``wte``, ``embed_out``,
``word_embeddings``, ``output.weight``) may differ in their first dimension because fine-tuning added tokens.
Rows are token ids, shared as a prefix; the delta of rows present on both sides is their difference, and
rows present on one side only get a zero delta (those tokens keep their value in the anchor). Any other
shape difference is an error naming the tensor and both shapes.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from safesearch.checkpoint import Checkpoint, TensorInfo
from safesearch.errors import UserError
from safesearch.graftspec import GraftSpec, VectorSpec

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_out|word_embeddings)\.weight$|^output\.weight$")


# -- pure functions on tensors -----------------------------------------------------------------------


def is_vocab_tensor(name: str) -> bool:
    return bool(VOCAB_TENSOR.search(name))


def fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with ``rows`` rows: extra rows dropped, missing rows zero."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows]
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def check_shapes(name: str, a: tuple[int, ...], b: tuple[int, ...], what: str) -> None:
    """Equal shapes, or vocabulary rows differing only in their number; otherwise a shape-mismatch error."""
    if a == b:
        return
    if is_vocab_tensor(name) and len(a) == len(b) >= 1 and a[1:] == b[1:]:
        return
    raise UserError(f"shape mismatch for tensor {name!r}: {what} {list(a)} vs {list(b)}")


def difference(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """``a - b`` in fp32 with ``rows`` rows; rows only one side has get a zero delta (see the module docstring)."""
    if a.shape == b.shape and (a.dim() == 0 or a.shape[0] == rows):
        return a.float() - b.float()
    n = min(a.shape[0], b.shape[0], rows)
    out = torch.zeros((rows, *a.shape[1:]), dtype=torch.float32, device=a.device)
    out[:n] = a[:n].float() - b[:n].float()
    return out


def gram_schmidt(tau: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``tau`` minus its projection on ``other`` (dot products in fp64); unchanged when ``other`` is zero."""
    t, o = tau.double().flatten(), other.double().flatten()
    oo = torch.dot(o, o)
    if oo == 0:
        return tau
    return (t - torch.dot(t, o) / oo * o).view(tau.shape).to(tau.dtype)


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (ties at the threshold kept)."""
    n = tau.numel()
    k = max(1, round(density * n))
    if k >= n:
        return tau
    mag = tau.abs().flatten()
    threshold = torch.kthvalue(mag, n - k + 1).values
    return tau * (tau.abs() >= threshold)


def dare(tau: torch.Tensor, rate: float, seed: int, key: str) -> torch.Tensor:
    """Drop each entry with probability ``rate`` and rescale the rest by ``1/(1-rate)``.

    The mask is drawn on the CPU from a generator seeded by (``seed``, ``key``), so it is the same on every
    device and in any order of computation.
    """
    if rate == 0:
        return tau
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    keep = torch.rand(tau.shape, generator=gen) >= rate
    return tau * keep.to(tau.device) / (1.0 - rate)


def suggest_prefix_map(names: Iterable[str], anchor_names: Iterable[str]) -> dict[str, str]:
    """Prefix replacements that would carry most of ``names`` onto ``anchor_names`` (longest shared suffix)."""
    by_suffix: dict[str, set[str]] = {}
    for a in anchor_names:
        parts = a.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), set()).add(".".join(parts[:i]) + ("." if i else ""))
    votes: Counter[tuple[str, str]] = Counter()
    for n in names:
        parts = n.split(".")
        for i in range(len(parts) - 1):  # at least two components of suffix
            prefixes = by_suffix.get(".".join(parts[i:]))
            if prefixes and len(prefixes) == 1:
                votes[(".".join(parts[:i]) + ("." if i else ""), next(iter(prefixes)))] += 1
                break
    return dict(pair for pair, _ in votes.most_common(3) if pair[0] != pair[1])


# -- from a spec ---------------------------------------------------------------------------------------


@dataclass
class Sources:
    """The spec's checkpoints opened, with each one's parameters under the anchor's names."""

    spec: GraftSpec
    checkpoints: dict[str, Checkpoint]
    # checkpoint name -> anchor-side name -> (the checkpoint's own model name, its tensor info)
    mapped: dict[str, dict[str, tuple[str, TensorInfo]]]
    # vector -> the anchor parameters it has a delta for: checked once, reused by every compute_vectors call
    # (an export computes the vectors one name at a time)
    covered: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def anchor(self) -> Checkpoint:
        return self.checkpoints[self.spec.anchor]

    def load(self, ckpt: str, name: str, device: torch.device) -> torch.Tensor:
        info = self.mapped[ckpt][name][1]
        return self.checkpoints[ckpt].load(info.key, device=device)

    def names_of(self, vector: str) -> frozenset[str]:
        """:func:`vector_names` of the spec's vector ``vector``, computed once."""
        if vector not in self.covered:
            self.covered[vector] = frozenset(vector_names(self, self.spec.vectors[vector]))
        return self.covered[vector]


def open_sources(spec: GraftSpec) -> Sources:
    """Open every checkpoint the spec uses and map its parameters onto the anchor's names."""
    used = {spec.anchor} | {c for v in spec.vectors.values() for c in (v.plus, v.minus)}
    checkpoints = {n: Checkpoint(spec.checkpoints[n].path, label=f"{n} ({spec.checkpoints[n].path})")
                   for n in spec.checkpoints if n in used}
    mapped: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for n, ckpt in checkpoints.items():
        layout = ckpt.layout
        cs = spec.checkpoints[n]
        m: dict[str, tuple[str, TensorInfo]] = {}
        for own in layout.parameters:
            m[cs.map_name(own)] = (own, ckpt.tensors[layout.names[own]])
        mapped[n] = m
    sources = Sources(spec, checkpoints, mapped)
    for v in spec.vectors:
        sources.names_of(v)  # every naming and shape error before any tensor is read
    return sources


def vector_names(sources: Sources, v: VectorSpec) -> list[str]:
    """The anchor parameters vector ``v`` has a delta for; raises on architecture or shape mismatches."""
    a, b = sources.checkpoints[v.plus], sources.checkpoints[v.minus]
    if a.architecture != b.architecture:
        raise UserError(
            f"vector {v.name}: architecture mismatch: {v.plus} is {a.architecture}, {v.minus} is {b.architecture}"
        )
    ma, mb = sources.mapped[v.plus], sources.mapped[v.minus]
    maps = {c: dict(sources.spec.checkpoints[c].prefix_map) for c in (v.plus, v.minus)}
    if maps[v.plus] != maps[v.minus] and ma.keys() != mb.keys() and (
        {own for own, _ in ma.values()} == {own for own, _ in mb.values()}
    ):  # same model names on disk, renamed on one side only: the maps, not the models, disagree
        raise UserError(
            f"vector {v.name}: {v.plus} and {v.minus} have the same parameter names but different prefix_maps "
            f"({maps[v.plus] or 'none'} vs {maps[v.minus] or 'none'}): the two sides of a vector need the same "
            f"prefix_map; give checkpoints.{v.plus} and .{v.minus} the same one"
        )
    for x, y, mx, my in ((v.plus, v.minus, ma, mb), (v.minus, v.plus, mb, ma)):
        extra = [n for n in mx if n not in my]
        if extra:
            raise UserError(
                f"vector {v.name}: architecture mismatch: {x} has {len(extra)} parameters {y} lacks, e.g. {mx[extra[0]][0]!r}"
            )
    anchor = sources.anchor.layout
    params = anchor.parameters
    foreign = [n for n in ma if n not in params and n not in anchor.aliases]
    if foreign:
        where = f"{v.plus} ({a.architecture})"
        there = f"the anchor {sources.spec.anchor} ({anchor.architecture})"
        suggestion = suggest_prefix_map([ma[n][0] for n in foreign], params)
        hint = f"; names differ: add to checkpoints.{v.plus} and .{v.minus}: prefix_map: {suggestion}" if suggestion else ""
        if len(foreign) == len(ma):
            raise UserError(
                f"vector {v.name}: none of the {len(ma)} parameters of {where} is a parameter of {there}, "
                f"e.g. {foreign[0]!r}{hint or '; map its names onto the anchor with a prefix_map'}"
            )
        raise UserError(
            f"vector {v.name}: architecture mismatch: {len(foreign)} of the {len(ma)} parameters of {where} are not "
            f"parameters of {there}, e.g. {foreign[0]!r}{hint}"
        )
    names = [n for n in ma if n in params]
    for n in names:
        check_shapes(n, ma[n][1].shape, mb[n][1].shape, f"{v.plus} vs {v.minus}:")
        check_shapes(n, ma[n][1].shape, params[n], f"{v.plus} vs anchor {sources.spec.anchor}:")
    return names


def vector_order(vectors: Mapping[str, VectorSpec]) -> list[str]:
    """Vectors ordered so that each comes after the one it is orthogonalized against."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        dep = vectors[n].orthogonalize
        if dep is not None:
            visit(dep)
        order.append(n)

    for n in vectors:
        visit(n)
    return order


def compute_vectors(
    sources: Sources,
    names: Iterable[str],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, dict[str, torch.Tensor]]:
    """Every vector of the spec for the anchor parameters ``names``, stored in ``dtype`` on ``device``.

    Tensors are read one name at a time, so the working memory beyond the result is a few fp32 tensors.
    """
    spec = sources.spec
    wanted = set(names)
    covers = {v: sources.names_of(v) & wanted for v in spec.vectors}
    out: dict[str, dict[str, torch.Tensor]] = {v: {} for v in spec.vectors}
    order = vector_order(spec.vectors)
    params = sources.anchor.layout.parameters
    for name in (n for n in params if n in wanted):
        cache: dict[str, torch.Tensor] = {}

        def load(ckpt: str, name: str = name, cache: dict[str, torch.Tensor] = cache) -> torch.Tensor:
            if ckpt not in cache:
                cache[ckpt] = sources.load(ckpt, name, device)
            return cache[ckpt]

        for vname in order:
            if name not in covers[vname]:
                continue
            v = spec.vectors[vname]
            tau = difference(load(v.plus), load(v.minus), params[name][0] if params[name] else 0)
            if v.orthogonalize is not None and name in out[v.orthogonalize]:
                tau = gram_schmidt(tau, out[v.orthogonalize][name].float())
            if v.trim is not None:
                tau = trim_to_density(tau, v.trim)
            if v.dare is not None:
                tau = dare(tau, v.dare.rate, v.dare.seed, f"{vname}\0{name}")
            out[vname][name] = tau.to(dtype)
    return out
