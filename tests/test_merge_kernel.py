"""The merge kernels: eager's bits against an independent reference, the compiled kernel against eager bit
for bit (tensor by tensor, through a Merger, into an export), and ``auto``'s fallback to eager when
torch.compile cannot build (one line on stderr, the same bits)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_graft_family, graft_spec_dict, load_tiny_model

import safesearch.merging as merging
from safesearch.errors import UserError
from safesearch.export import export_merged
from safesearch.graftspec import spec_from_dict
from safesearch.grouping import Grouping
from safesearch.merging import Merger, compiled_kernel, compiled_problem, merge_into

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _random(n: int, n_terms: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:
    """An anchor and ``n_terms`` terms of assorted scales (so products and sums round at different bits)."""
    g = torch.Generator().manual_seed(seed)
    anchor = (torch.randn(n, generator=g) * 0.5).to(dtype)
    coefs = [1.37, -0.61, 2.9][:n_terms]
    return anchor, [(c, (torch.randn(n, generator=g) * 10.0**-k).to(dtype)) for k, c in enumerate(coefs)]


def _fma_reference(anchor: torch.Tensor, terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """The documented arithmetic, outside torch's kernels: acc = fp32(anchor); per term acc = fma(fp32(c),
    fp32(tau), acc), emulated in float64 (the product is exact there, and so, but for a 2^-29 chance of a
    double-rounding tie, is the rounded sum); then the cast to the anchor's dtype."""
    acc = anchor.float()
    for c, t in terms:
        c32 = torch.tensor(c, dtype=torch.float32).double()
        acc = (acc.double() + c32 * t.float().double()).float()
    return acc.to(anchor.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_kernel_is_one_fused_multiply_add_per_term_in_fp32(dtype):
    for n in (1, 7, 4099, 100_003):
        for n_terms in (1, 2, 3):
            anchor, terms = _random(n, n_terms, dtype, seed=n + n_terms)
            want = _fma_reference(anchor, terms)
            for chunk in (333, 1 << 16):
                scratch = torch.empty(chunk)
                for cast in (None, torch.empty(chunk)):  # bf16/fp16 terms cast into a scratch, or by add_
                    out = torch.full_like(anchor, float("nan"))
                    merge_into(out, anchor, [*terms, (0.0, terms[0][1])], scratch, cast)
                    assert torch.equal(out, want), (dtype, n, n_terms, chunk, cast is None)


def test_the_fp32_reference_tells_fused_from_rounded_products():
    """The reference would catch a kernel that rounds ``c * tau`` before adding (the old compiled kernel)."""
    anchor, terms = _random(100_003, 2, torch.float32, seed=1)
    acc = anchor.clone()
    for c, t in terms:
        acc = acc + torch.tensor(c, dtype=torch.float32) * t
    assert not torch.equal(acc, _fma_reference(anchor, terms))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_compiled_kernel_gives_the_eager_kernels_bits(dtype):
    """Compiles (seconds, cached on disk by torch): the probe passes, and other lengths agree too."""
    for n_terms in (1, 2):
        assert compiled_problem(n_terms, dtype, torch.device("cpu")) is None
        for n in (2, 17, 300_007):
            anchor, terms = _random(n, n_terms, dtype, seed=7 * n + n_terms)
            got = torch.empty_like(anchor)
            coefs = torch.tensor([c for c, _ in terms], dtype=torch.float32)
            compiled_kernel(n_terms)(got, anchor, coefs, *(t for _, t in terms))
            assert torch.equal(got, _fma_reference(anchor, terms)), (dtype, n_terms, n)


def _synthetic_merger(kernel: str | None, dtype: torch.dtype = torch.bfloat16) -> tuple[Merger, dict[str, torch.Tensor]]:
    """A merger over one tensor past COMPILED_MIN (the compiled kernel's) and one under it (eager's)."""
    shapes = {"big": (merging.COMPILED_MIN + 5,), "small": (3, 100)}
    g = torch.Generator().manual_seed(11)
    anchor = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    vectors = {v: {n: (torch.randn(s, generator=g) * 1e-2).to(dtype) for n, s in shapes.items()} for v in ("x", "y")}
    grouping = Grouping(groups={"g": ["big", "small"]}, frozen=[])
    merger = Merger(anchor, vectors, grouping) if kernel is None else Merger(anchor, vectors, grouping, kernel=kernel)
    return merger, {n: torch.empty_like(a) for n, a in anchor.items()}


@pytest.mark.slow
def test_auto_merges_with_the_compiled_kernel_and_the_eager_bits():
    auto, out = _synthetic_merger(None)
    eager, want = _synthetic_merger("eager")
    assert auto.kernel == "auto"  # the default
    coefs = {"x": {"g": 0.8}, "y": {"g": -0.1}}
    auto.merge_into(out, coefs)
    eager.merge_into(want, coefs)
    assert auto.compiles(2) and not eager.compiles(2)
    for name in out:
        assert torch.equal(out[name], want[name]), name


@pytest.mark.slow
def test_live_compiled_merges_equal_fresh_eager_merges_and_exports(tmp_path, monkeypatch):
    """The tiny model's tensors, all under COMPILED_MIN, sent to the compiled kernel: A, B, A in place
    equals a fresh eager merge of A, and an export of A (written by the compiled kernel) equals both."""
    monkeypatch.setattr(merging, "COMPILED_MIN", 1)
    family = build_graft_family(tmp_path / "family", seed=100)
    spec = spec_from_dict(graft_spec_dict(family))
    compiled = Merger.from_spec(spec, device="cpu", kernel="compiled")
    a = compiled.parse({"safety": {"*": 0.7, "layer.0": 1.5, "head": -0.25}, "medical": {"*": 0.1, "embed": -0.3}})
    b = compiled.parse({"safety": {"*": -2.0}, "medical": {"*": 2.5}})
    live, fresh = load_tiny_model(family["medical"]), load_tiny_model(family["medical"])
    for coefs in (a, b, a):
        compiled.apply(live, coefs)
    Merger.from_spec(spec, device="cpu", kernel="eager").apply(fresh, a)
    exported = load_file(export_merged(compiled, a, tmp_path / "export") / "model.safetensors")
    want = dict(fresh.named_parameters())
    for name, p in live.named_parameters():
        assert torch.equal(p, want[name]), name
        if name in exported:
            assert torch.equal(exported[name], want[name]), name


def test_an_unknown_kernel_is_refused():
    with pytest.raises(UserError, match="merge kernel 'fast' is not one of auto, compiled, eager"):
        _synthetic_merger("fast")


_NO_COMPILER = textwrap.dedent("""
    import torch
    from safesearch.errors import UserError
    from safesearch.grouping import Grouping
    from safesearch.merging import COMPILED_MIN, Merger, merge_into

    def _synthetic_merger(kernel):  # the test module's, without its imports (transformers: seconds)
        shapes = {"big": (COMPILED_MIN + 5,), "small": (3, 100)}
        g = torch.Generator().manual_seed(11)
        anchor = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
        vectors = {v: {n: (torch.randn(s, generator=g) * 1e-2).bfloat16() for n, s in shapes.items()} for v in "xy"}
        merger = Merger(anchor, vectors, Grouping(groups={"g": ["big", "small"]}, frozen=[]), kernel=kernel)
        return merger, {n: torch.empty_like(a) for n, a in anchor.items()}

    auto, out = _synthetic_merger("auto")
    for coefs in ({"x": {"g": 0.8}, "y": {"g": -0.1}}, {"x": {"g": 0.3}}):  # two term counts, one notice
        auto.merge_into(out, coefs)
        for name, a in auto.anchor.items():
            terms = [(coefs[v].get("g", 0.0), t[name]) for v, t in auto.vectors.items() if v in coefs]
            want = torch.empty_like(a)
            merge_into(want, a, terms, torch.empty(1 << 12))
            assert torch.equal(out[name], want), name
    strict, out = _synthetic_merger("compiled")
    try:
        strict.merge_into(out, {"x": {"g": 0.8}})
    except UserError as e:
        print("refused:", e)
""")


@pytest.mark.slow
def test_auto_falls_back_to_eager_with_one_line_when_no_compiler_works(tmp_path):
    """CXX names a missing compiler (and torch's cache is empty, so nothing compiled earlier is reused)."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("note: merge kernel auto: torch.compile has no C++ compiler (InvalidCxxCompiler: ")
    assert "no-such-g++" in lines[0] and lines[0].endswith("; merging with the eager kernel (the same bits, slower)")
    assert run.stdout.startswith("refused: merge kernel compiled: torch.compile has no C++ compiler (")


def test_a_study_spec_takes_the_mergers_kernels():
    from safesearch.studyspec import KERNELS

    assert KERNELS == merging.KERNELS and merging.DEFAULT_KERNEL in KERNELS


def test_a_compiled_merge_that_fails_after_its_probe_falls_back_to_eager(monkeypatch, capsys):
    def broken(n_terms: int):
        def kernel(*args: torch.Tensor) -> None:
            raise RuntimeError("recompiling failed\nwith details")
        return kernel

    monkeypatch.setattr(merging, "compiled_problem", lambda n_terms, dtype, device: None)
    monkeypatch.setattr(merging, "compiled_kernel", broken)
    monkeypatch.setattr(merging, "_noticed", [])
    coefs = {"x": {"g": 0.8}, "y": {"g": -0.1}}
    strict, out = _synthetic_merger("compiled")
    with pytest.raises(RuntimeError, match="recompiling failed"):
        strict.merge_into(out, coefs)
    auto, out = _synthetic_merger("auto")
    eager, want = _synthetic_merger("eager")
    for _ in range(2):
        auto.merge_into(out, coefs)
    eager.merge_into(want, coefs)
    assert all(torch.equal(out[n], want[n]) for n in out) and not auto.compiles(2)
    assert capsys.readouterr().err == ("note: merge kernel auto: torch.compile failed (RuntimeError: recompiling failed); "
                                       "merging with the eager kernel (the same bits, slower)\n")
