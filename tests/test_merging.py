"""The in-place merger: a numpy reference, no drift, in place, fp32 accumulation, image-text trunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_models import (
    build_graft_family,
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_qwen2,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    finetuned_copy,
    graft_spec_dict,
    load_tiny_model,
)

from safesearch.checkpoint import Checkpoint
from safesearch.errors import UserError
from safesearch.graftspec import spec_from_dict
from safesearch.merging import Merger, merge_into, merged

COEFS_A = {"safety": {"*": 0.7, "layer.0": 1.5, "head": -0.25}, "medical": {"*": 0.1, "embed": -0.3}}
COEFS_B = {"safety": {"*": -2.0, "layer.1": 3.0}, "medical": {"layer.0": 0.9, "norm": 4.0}}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_graft_family(tmp_path_factory.mktemp("merge"), seed=100)


@pytest.fixture(scope="module")
def merger(family):
    return Merger.from_spec(spec_from_dict(graft_spec_dict(family)), device="cpu")


def _reference(family, group_of, coefs) -> dict[str, np.ndarray]:
    """anchor + sum c * (A - B) straight from the files, in float64."""
    al, un, me = (load_file(family[n] / "model.safetensors") for n in ("aligned", "unaligned", "medical"))
    out = {}
    for name, anchor in me.items():
        g = group_of[name]
        safety = al[name].astype(np.float64) - un[name].astype(np.float64)
        medical = me[name].astype(np.float64) - al[name].astype(np.float64)
        out[name] = anchor.astype(np.float64) + coefs["safety"][g] * safety + coefs["medical"][g] * medical
    return out


def test_merge_equals_a_numpy_reference(family, merger):
    coefs = merger.parse(COEFS_A)
    model = load_tiny_model(family["medical"])
    merger.apply(model, coefs)
    ref = _reference(family, merger.grouping.group_of, coefs)
    params = dict(model.named_parameters())
    assert set(params) == set(ref)
    for name, r in ref.items():
        got = params[name].detach().numpy().astype(np.float64)
        # fp32 rounding of the inputs and of three accumulations
        np.testing.assert_allclose(got, r, rtol=0, atol=4 * np.finfo(np.float32).eps * (np.abs(r).max() + 1))


def test_merging_a_then_b_then_a_is_bit_identical_to_a_fresh_merge(family, merger):
    a, b = merger.parse(COEFS_A), merger.parse(COEFS_B)
    model = load_tiny_model(family["medical"])
    for coefs in (a, b, a):
        merger.apply(model, coefs)
    fresh_model = load_tiny_model(family["medical"])
    Merger.from_spec(spec_from_dict(graft_spec_dict(family)), device="cpu").apply(fresh_model, a)
    fresh = dict(fresh_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, fresh[name]), name


def test_apply_writes_in_place_without_reallocating(family, merger):
    model = load_tiny_model(family["medical"])
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    merger.apply(model, merger.parse(COEFS_B))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert not torch.equal(dict(model.named_parameters())["model.norm.weight"], Checkpoint(family["medical"]).load("model.norm.weight"))


def test_zero_coefficients_restore_the_anchor(family, merger):
    model = load_tiny_model(family["medical"])
    merger.apply(model, merger.parse(COEFS_A))
    merger.apply(model, merger.parse({}))
    ckpt = Checkpoint(family["medical"])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ckpt.load(name)), name


def test_iter_merged_yields_what_apply_writes(family, merger):
    coefs = merger.parse(COEFS_B)
    model = load_tiny_model(family["medical"])
    merger.apply(model, coefs)
    params = dict(model.named_parameters())
    seen = [name for name, t in merger.iter_merged(coefs) if torch.equal(t, params[name])]
    assert seen == merger.names


def test_bf16_merge_accumulates_in_fp32():
    g = torch.Generator().manual_seed(3)
    anchor = torch.randn(4096, generator=g).to(torch.bfloat16)
    taus = [(torch.randn(4096, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(2)]
    terms = [(0.37, taus[0]), (-1.3, taus[1])]
    exact = (anchor.double() + 0.37 * taus[0].double() - 1.3 * taus[1].double()).to(torch.bfloat16)
    got = merged(anchor, terms, chunk=1000)
    # one rounding at the end: equal to the exactly rounded sum but for double-rounding ties
    assert (got != exact).float().mean().item() < 0.002
    step = anchor.clone()
    for c, t in terms:  # what bf16 accumulation would give: a rounding per term
        step = step + c * t
    assert (step != exact).float().mean().item() > 0.05


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(4)
    anchor, tau = torch.randn(10_001, generator=g), torch.randn(10_001, generator=g)
    whole = merged(anchor, [(0.5, tau)], chunk=1 << 20)
    out = torch.empty_like(anchor)
    merge_into(out, anchor, [(0.5, tau)], torch.empty(333))
    torch.testing.assert_close(out, whole, rtol=1e-7, atol=0)


def test_bind_refuses_a_model_of_another_architecture(family, merger, tmp_path):
    other = load_tiny_model(build_tiny_qwen2(tmp_path / "q", seed=5))
    with pytest.raises(UserError, match=r"architecture mismatch: the model \(Qwen2ForCausalLM\) has parameter .*bias"):
        merger.apply(other, merger.parse(COEFS_A))
    bf16 = load_tiny_model(family["medical"], dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"torch.bfloat16.*the merger holds .* torch.float32"):
        merger.bind(bf16)


@pytest.mark.parametrize(
    ("text_builder", "image_text_builder"),
    [(build_tiny_llama, build_tiny_llava), (build_tiny_qwen2, build_tiny_qwen2_vl), (build_tiny_qwen2, build_tiny_qwen2_5_vl)],
)
def test_text_vector_onto_the_language_model_of_an_image_text_model(tmp_path, text_builder, image_text_builder):
    anchor = image_text_builder(tmp_path / "anchor", seed=6)
    unaligned = text_builder(tmp_path / "unaligned", seed=7)
    aligned = finetuned_copy(unaligned, tmp_path / "aligned", seed=8)
    prefix = {"model.": "model.language_model."}
    spec = spec_from_dict({
        "anchor": "anchor",
        "checkpoints": {"anchor": str(anchor), "aligned": {"path": str(aligned), "prefix_map": prefix},
                        "unaligned": {"path": str(unaligned), "prefix_map": prefix}},
        "vectors": {"safety": {"diff": "aligned - unaligned"}},
        "groups": {"preset": "layer"},
    })
    m = Merger.from_spec(spec, device="cpu")
    assert m.active_groups() == {"safety": ["embed", "layer.0", "layer.1", "norm", "head"]}
    model = load_tiny_model(anchor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m.apply(model, m.parse({"safety": {"*": 2.0}}))
    al, un = load_file(aligned / "model.safetensors"), load_file(unaligned / "model.safetensors")
    for name, p in model.named_parameters():
        text = name.replace("model.language_model.", "model.")
        if text in al:
            expect = before[name].numpy() + 2.0 * (al[text].astype(np.float64) - un[text])
            np.testing.assert_allclose(p.detach().numpy(), expect, rtol=0, atol=1e-6)
        else:  # vision tower and projector: untouched
            assert torch.equal(p.detach(), before[name]), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 7, 8, 9]])).logits).all()


def test_text_vector_without_prefix_map_suggests_one(tmp_path):
    anchor = build_tiny_qwen2_vl(tmp_path / "anchor", seed=9)
    unaligned = build_tiny_qwen2(tmp_path / "unaligned", seed=10)
    aligned = finetuned_copy(unaligned, tmp_path / "aligned", seed=11)
    spec = spec_from_dict({
        "anchor": "anchor",
        "checkpoints": {"anchor": str(anchor), "aligned": str(aligned), "unaligned": str(unaligned)},
        "vectors": {"safety": {"diff": "aligned - unaligned"}},
    })
    with pytest.raises(UserError, match=r"prefix_map: \{'model.': 'model.language_model.'\}"):
        Merger.from_spec(spec, device="cpu")


def test_prefix_map_on_one_side_of_a_vector_is_named(tmp_path):
    """Qwen2.5-7B-Instruct's vector onto Qwen2.5-VL with the map given to one of its two checkpoints: the
    maps disagree, not the architectures."""
    anchor = build_tiny_qwen2_5_vl(tmp_path / "anchor", seed=9)
    unaligned = build_tiny_qwen2(tmp_path / "unaligned", seed=10)
    aligned = finetuned_copy(unaligned, tmp_path / "aligned", seed=11)
    spec = spec_from_dict({
        "anchor": "anchor",
        "checkpoints": {"anchor": str(anchor), "unaligned": str(unaligned),
                        "aligned": {"path": str(aligned), "prefix_map": {"model.": "model.language_model."}}},
        "vectors": {"safety": {"diff": "aligned - unaligned"}},
    })
    with pytest.raises(UserError) as e:
        Merger.from_spec(spec, device="cpu")
    assert "architecture mismatch" not in str(e.value)
    assert str(e.value) == (
        "vector safety: aligned and unaligned have the same parameter names but different prefix_maps "
        "({'model.': 'model.language_model.'} vs none): the two sides of a vector need the same prefix_map; "
        "give checkpoints.aligned and .unaligned the same one")


def test_frozen_parameters_are_never_written(family):
    spec = spec_from_dict(graft_spec_dict(family, groups={"preset": "layer", "frozen": ["embed_tokens"]}))
    m = Merger.from_spec(spec, device="cpu")
    assert "model.embed_tokens.weight" not in m.names
    assert "embed" not in m.grouping.groups


def test_compiled_kernel_agrees_with_eager_and_does_not_drift(family, merger):
    """kernel="compiled" gives eager's bits, no drift (these tensors are under COMPILED_MIN, so eager merges
    them: tests/test_merge_kernel.py sends them to the compiled kernel)."""
    spec = spec_from_dict(graft_spec_dict(family))
    fused = Merger.from_spec(spec, device="cpu", kernel="compiled")
    a, b = fused.parse(COEFS_A), fused.parse({"safety": {"*": -1.0}, "medical": {"*": 2.5}})
    model, eager_model, fresh = (load_tiny_model(family["medical"]) for _ in range(3))
    for coefs in (a, b, a):
        fused.apply(model, coefs)
    merger.apply(eager_model, a)
    Merger.from_spec(spec, device="cpu", kernel="compiled").apply(fresh, a)
    eager, again = dict(eager_model.named_parameters()), dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, again[name]), name
        assert torch.equal(p, eager[name]), name
