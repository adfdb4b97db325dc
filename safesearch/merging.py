"""The in-place merger: ``theta = theta_anchor + sum_v sum_g c[v][g] * tau_v[g]``, one pass over the tensors.

Two layers, so that any backend can run the same merge where its weights live:

* :func:`merge_into` is the arithmetic for one tensor: ``out <- anchor + sum_i c_i * tau_i``, accumulated in
  fp32 through a small scratch buffer that is walked over the tensor in chunks (a chunk stays in cache, so
  the memory traffic is one read of each operand and one write of ``out``, whatever the dtype).
* :class:`Merger` keeps the anchor and the vectors resident on the model's device, keyed by model name, and
  writes merged values into any ``{name: tensor}`` view with ``copy_``: a transformers model's parameters
  (:meth:`Merger.apply`), or a vLLM worker's. :meth:`Merger.iter_merged` yields ``(name, tensor)`` pairs for
  loaders that take an iterator of weights (vLLM's ``load_weights``).

The bits. Both kernels compute, per element, ``acc = fp32(anchor)``, then for each live term in the
vectors' order ``acc = fma(fp32(c_i), fp32(tau_i), acc)`` (one fp32 rounding per term), then ``out = acc``
rounded to ``out``'s dtype (to nearest even). Eager gets the fused multiply-add from torch's
``add_(tau, alpha=c)`` (its vectorized CPU loop on AVX2 and AVX-512, and its CUDA kernel; checked against a
float64 emulation by ``tests/test_merge_kernel.py``); the compiled kernel asks for one (``prims.fma``:
inductor would round ``c * tau`` first, as the compiled kernel did before issue 18, one last bit off in
places). So a merge's bits depend only on the inputs, never on the kernel, the chunk size or the thread
count, and a study whose workers run different kernels (one without a C++ compiler) still scores the very
weights an export writes. A machine where the two could disagree (a CPU without FMA) is caught by the probe
below: there ``auto`` merges with eager.

The kernels. ``eager`` is the chunked loop of :func:`merge_into`: plain torch ops, nothing to compile, but
about six elementwise passes per chunk, each a parallel region: 3-5x the copy bound on this project's 2-core
CPU, and far worse when other processes hold the cores (each region waits for both threads). ``compiled``
fuses the sum into one loop with ``torch.compile`` (a C++ kernel on CPU, Triton on CUDA; compiled once per
number of terms and dtype, 5-20 s, cached on disk by torch): one read of each operand and one write, one
parallel region per tensor (``benchmarks/merge.py`` measures both against the copy bound). ``auto``, the default, is
``compiled`` where it works and ``eager`` where it does not: before its first use, a compiled kernel is
compiled and run on a probe (:data:`PROBE`), and it is used only if it gives the eager kernel's bits there;
when compiling fails (no C++ compiler: ``CXX``, else ``g++``; no Triton) or the bits differ, ``auto`` merges
with ``eager`` and says so in one line on stderr, once per process; ``compiled`` raises instead. Tensors
of at most :data:`COMPILED_MIN` elements are merged by ``eager`` under every kernel (they fit in one
scratch chunk, where eager is as fast), so a small model never waits for a compiler.

Every merge starts from the resident anchor, so merging A, then B, then A again gives the very bits of a
fresh merge of A. Parameters that no vector touches (frozen ones, or ones the vectors lack) are never
written and have no resident copy: the bound model must hold the anchor's weights, as loaded.
"""

from __future__ import annotations

import functools
import math
import sys
import types
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

KERNELS = ("auto", "compiled", "eager")
DEFAULT_KERNEL = "auto"
# Tensors up to this many elements are merged by the eager kernel under every kernel: they fit in one CPU
# scratch chunk, where the eager loop is as fast, and a model made only of them (the toy world, the tests'
# models) never waits seconds for a compiler. Same bits either way.
COMPILED_MIN = DEFAULT_CHUNK["cpu"]
# Elements of the probe a compiled kernel must merge to the eager kernel's bits before it is used: past a
# few vector widths and an odd tail, so both its vectorized loop and its scalar remainder are checked.
PROBE = (1 << 16) + 3

# Exact casts to fp32: a term in these dtypes is cast into a scratch of its own before the add (what add_
# would do into a temporary it allocates per call), so the add sees two fp32 operands.
_EXACT_IN_FP32 = (torch.bfloat16, torch.float16)


def merge_into(
    out: torch.Tensor,
    anchor: torch.Tensor,
    terms: Sequence[tuple[float, torch.Tensor]],
    scratch: torch.Tensor,
    cast: torch.Tensor | None = None,
) -> None:
    """``out <- anchor + sum c * tau`` over ``terms``, accumulated in fp32 in chunks of ``scratch``'s size.

    All tensors contiguous, of ``out``'s shape, ``out`` overlapping no term; ``scratch`` (and ``cast``,
    optional, as large: where bf16 or fp16 terms are cast to fp32) are flat fp32 buffers on their device.
    Zero coefficients are skipped. The result depends only on the inputs (see the module docstring).
    """
    live = [(float(c), t.reshape(-1)) for c, t in terms if c != 0]
    if not live:
        out.copy_(anchor)
        return
    o, a = out.view(-1), anchor.reshape(-1)
    n, step = o.numel(), scratch.numel()
    direct = o.dtype == torch.float32  # out is an fp32 buffer already: accumulate there, no final copy
    for s in range(0, n, step):
        e = min(n, s + step)
        buf = o[s:e] if direct else scratch[: e - s]
        buf.copy_(a[s:e])
        for c, t in live:
            if cast is not None and t.dtype in _EXACT_IN_FP32:
                buf.add_(cast[: e - s].copy_(t[s:e]), alpha=c)
            else:
                buf.add_(t[s:e], alpha=c)
        if not direct:
            o[s:e].copy_(buf)


def _fused(out: torch.Tensor, anchor: torch.Tensor, coefs: torch.Tensor, *taus: torch.Tensor) -> None:
    # prims.fma, not ``acc + c * tau``: inductor keeps a multiply and an add apart (two roundings), eager's
    # add_(tau, alpha=c) fuses them (one rounding), and the kernels must agree to the bit.
    acc = anchor.float()
    for i, tau in enumerate(taus):
        acc = torch.ops.prims.fma(coefs[i], tau.float(), acc)
    out.copy_(acc)


@functools.cache
def compiled_kernel(n_terms: int) -> Any:
    """``kernel(out, anchor, coefs, *taus)``: ``out <- anchor + sum coefs[i] * taus[i]`` fused, fp32 inside.

    ``coefs`` is a 1-D fp32 tensor on the data's device (values change without recompiling); tensors are
    1-D, of more than one element, any length (compiled with dynamic shapes). Compiles on first call.
    """
    import torch._inductor.inductor_prims  # noqa: F401  (registers torch.ops.prims.fma)

    # A code object of its own per term count: torch.compile keeps its compiled variants per code object
    # (8 at most), so one shared ``_fused`` would run out with a few term counts times dtypes.
    code = _fused.__code__.replace(co_name=f"merge_{n_terms}_terms")
    fn = types.FunctionType(code, _fused.__globals__, code.co_name)
    return torch.compile(fn, dynamic=True, fullgraph=True)


_compile_failed: dict[str, str] = {}  # device type -> why torch.compile failed there


@functools.cache
def compiled_problem(n_terms: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the compiled kernel for ``n_terms`` terms cannot stand in for eager here (None: it can).

    Compiles it and merges :data:`PROBE` random elements with both kernels, in fp32 (where a second rounding
    shows) and in ``dtype``; any failure to compile (no C++ compiler, no Triton) is the answer's one line,
    and the answer for every later probe on that device type (each failing attempt costs seconds).
    """
    if device.type == "cpu" and device.type not in _compile_failed and (missing := _no_cpp_compiler()):
        _compile_failed[device.type] = missing
    if device.type in _compile_failed:
        return _compile_failed[device.type]
    for dt in dict.fromkeys((torch.float32, dtype)):
        g = torch.Generator().manual_seed(n_terms)
        anchor = torch.randn(PROBE, generator=g)
        taus = [torch.randn(PROBE, generator=g) * 10.0**-k for k in range(n_terms)]
        coefs = [0.7 - 1.9 * k for k in range(n_terms)]
        anchor, *taus = (t.to(device=device, dtype=dt) for t in (anchor, *taus))
        want, got = torch.empty_like(anchor), torch.empty_like(anchor)
        merge_into(want, anchor, list(zip(coefs, taus, strict=True)), torch.empty(PROBE, dtype=torch.float32, device=device))
        try:
            compiled_kernel(n_terms)(got, anchor, torch.tensor(coefs, dtype=torch.float32, device=device), *taus)
        except Exception as e:  # noqa: BLE001  (whatever stops torch.compile: the reason to fall back)
            _compile_failed[device.type] = f"torch.compile failed ({type(e).__name__}: {_first_line(e)})"
            return _compile_failed[device.type]
        if not torch.equal(got, want):
            return f"the compiled kernel's {dt} bits differ from the eager kernel's on {device.type}"
    return None


def _no_cpp_compiler() -> str | None:
    """Why torch.compile has no C++ compiler on CPU (None: it has one), told in a tenth of a second where the
    failing compile would take seconds (it traces and lowers the kernel before it looks for one)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch that moved it: the probe's compile tells all the same
        return None
    try:
        get_cpp_compiler()  # CXX, else g++; runs ``--version``
    except Exception as e:  # noqa: BLE001  (InvalidCxxCompiler, or whatever a broken toolchain raises)
        return f"torch.compile has no C++ compiler ({type(e).__name__}: {_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no message"


_noticed: list[str] = []


def _notice(line: str) -> None:
    """``line`` on stderr, the first time only: one fallback notice per process, whatever the term counts."""
    if not _noticed:
        _noticed.append(line)
        print(line, file=sys.stderr, flush=True)


def plan_merge(spec: GraftSpec, sources: Sources, device: torch.device | str | None,
               dtype: torch.dtype | None) -> tuple[Grouping, list[str], torch.device, torch.dtype]:
    """What a merge of ``spec`` writes: the anchor's parameters grouped, the names merged (grouped, and
    present in some vector's checkpoint; in the model's order), the device and the working dtype (the
    spec's where not given: ``auto`` is CUDA when present, the dtype the anchor's)."""
    params = sources.anchor.layout.parameters
    grouping = group_parameters(params, spec.groups)
    dev = torch.device(device) if device is not None else spec.torch_device()
    dt = dtype or spec.torch_dtype(anchor_dtype(sources))
    covered = {n for v in spec.vectors for n in sources.mapped[spec.vectors[v].plus] if n in params}
    return grouping, [n for n in params if n in grouping.group_of and n in covered], dev, dt


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
        kernel: str = DEFAULT_KERNEL,
    ) -> None:
        if kernel not in KERNELS:
            raise UserError(f"merge kernel {kernel!r} is not one of {', '.join(KERNELS)}")
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
        # bf16/fp16 terms are cast into a scratch of their own, not into a temporary allocated per add
        self.cast = torch.empty_like(self.scratch) if self.dtype in _EXACT_IN_FP32 else None
        self._failed: str | None = None  # why a compiled merge failed after its probe passed: eager from then on

    @classmethod
    def from_spec(
        cls,
        spec: GraftSpec,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk: int | None = None,
        sources: Sources | None = None,
        kernel: str = DEFAULT_KERNEL,
    ) -> Merger:
        """Open the spec's checkpoints, group the anchor's parameters, load the anchor and compute the vectors.

        ``device`` and ``dtype`` default to the spec's (``auto``: CUDA when present; the anchor's dtype);
        ``sources`` reuses checkpoints already opened with :func:`~safesearch.vectors.open_sources`;
        ``kernel`` is ``auto`` (the default), ``compiled`` or ``eager`` (see the module docstring).
        """
        sources = sources or open_sources(spec)
        grouping, touched, dev, dt = plan_merge(spec, sources, device, dtype)
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
        scratch = [self.scratch] if self.cast is None else [self.scratch, self.cast]
        tensors = [*self.anchor.values(), *(t for vec in self.vectors.values() for t in vec.values()), *scratch]
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
        if not live or a.numel() <= COMPILED_MIN or not self.compiles(len(live)):
            merge_into(out, a, [(c, t) for _, c, t in live], self.scratch, self.cast)
            return
        key = (g, tuple(i for i, _, _ in live))
        if key not in cache:
            cache[key] = torch.tensor([c for _, c, _ in live], dtype=torch.float32, device=self.device)
        try:
            compiled_kernel(len(live))(out.view(-1), a.view(-1), cache[key], *(t.view(-1) for _, _, t in live))
        except Exception as e:  # a recompile the probe did not foresee (other strides, say) that fails
            if self.kernel == "compiled":
                raise
            self._failed = f"torch.compile failed ({type(e).__name__}: {_first_line(e)})"
            self.compiles(len(live))  # the notice
            merge_into(out, a, [(c, t) for _, c, t in live], self.scratch, self.cast)

    def compiles(self, n_terms: int) -> bool:
        """Whether a merge of ``n_terms`` live terms runs the compiled kernel (compiles and probes it first).

        ``auto`` falls back to eager, with one line on stderr, where the compiled kernel fails its probe
        (:func:`compiled_problem`); ``compiled`` raises there instead.
        """
        if self.kernel == "eager":
            return False
        problem = self._failed or compiled_problem(n_terms, self.dtype, self.device)
        if problem is None:
            return True
        if self.kernel == "compiled":
            raise UserError(f"merge kernel compiled: {problem}")
        _notice(f"note: merge kernel auto: {problem}; merging with the eager kernel (the same bits, slower)")
        return False

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
