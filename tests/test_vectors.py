"""Task vectors: differences, Gram-Schmidt, trimming, DARE, name alignment and the vocabulary-row rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file
from tiny_models import (
    build_graft_family,
    build_tiny_llama,
    build_tiny_qwen2,
    finetuned_copy,
    graft_spec_dict,
    save_tiny_model,
    tiny_llama_config,
)

from safesearch.checkpoint import Checkpoint
from safesearch.errors import UserError
from safesearch.graftspec import spec_from_dict
from safesearch.vectors import (
    compute_vectors,
    dare,
    difference,
    fit_rows,
    gram_schmidt,
    open_sources,
    suggest_prefix_map,
    trim_to_density,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_graft_family(tmp_path_factory.mktemp("vec"), seed=10)


def test_gram_schmidt_removes_exactly_the_other_direction():
    g = torch.Generator().manual_seed(0)
    tau, other = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    out = gram_schmidt(tau, other)
    assert abs(torch.dot(out.flatten().double(), other.flatten().double())) < 1e-9 * tau.norm() * other.norm()
    # what was removed is parallel to the other vector
    removed = (tau - out).flatten()
    cos = torch.dot(removed, other.flatten()) / (removed.norm() * other.norm())
    assert cos.abs() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(gram_schmidt(tau, torch.zeros_like(tau)), tau)


def test_trim_keeps_the_largest_magnitudes_at_the_density():
    tau = torch.randn(100, 50, generator=torch.Generator().manual_seed(1))
    out = trim_to_density(tau, 0.2)
    kept = out != 0
    assert kept.sum().item() == 1000
    assert out[kept].abs().min() >= tau[~kept].abs().max()
    assert torch.equal(out[kept], tau[kept])
    assert torch.equal(trim_to_density(tau, 1.0), tau)


def test_dare_is_seeded_per_tensor_and_rescales():
    tau = torch.randn(200, 100, generator=torch.Generator().manual_seed(2))
    a, b = dare(tau, 0.3, seed=7, key="v\0w"), dare(tau, 0.3, seed=7, key="v\0w")
    assert torch.equal(a, b)
    assert not torch.equal(a, dare(tau, 0.3, seed=8, key="v\0w"))
    assert not torch.equal(a, dare(tau, 0.3, seed=7, key="v\0other"))
    kept = a != 0
    assert 0.65 < kept.float().mean().item() < 0.75
    assert torch.allclose(a[kept], tau[kept] / 0.7)


def test_vocabulary_rows_only_one_side_has_get_a_zero_delta():
    a, b = torch.ones(10, 4), torch.zeros(8, 4)
    d = difference(a, b, rows=12)
    assert d.shape == (12, 4)
    assert torch.equal(d[:8], torch.ones(8, 4)) and torch.equal(d[8:], torch.zeros(4, 4))
    assert fit_rows(d, 6).shape == (6, 4)


def test_suggested_prefix_map_carries_text_names_onto_the_language_model():
    text = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    anchor = ["model.language_model." + n[len("model.") :] for n in text] + ["model.visual.blocks.0.norm1.weight"]
    assert suggest_prefix_map(text, anchor) == {"model.": "model.language_model."}


def test_vectors_equal_a_numpy_reference_with_gram_schmidt_trim_and_dare(family):
    spec = spec_from_dict(graft_spec_dict(family, orthogonalize="medical", trim=0.5))
    sources = open_sources(spec)
    names = list(sources.anchor.layout.parameters)
    vecs = compute_vectors(sources, names, torch.float32, torch.device("cpu"))
    al, un, me = (load_file(family[n] / "model.safetensors") for n in ("aligned", "unaligned", "medical"))
    for name in names:
        medical = me[name].astype(np.float64) - al[name].astype(np.float64)
        np.testing.assert_allclose(vecs["medical"][name].numpy(), medical, rtol=1e-6, atol=1e-7)
        safety = al[name].astype(np.float64) - un[name].astype(np.float64)
        m32 = vecs["medical"][name].numpy().astype(np.float64).ravel()
        safety = safety - (safety.ravel() @ m32) / (m32 @ m32) * m32.reshape(safety.shape)
        got = vecs["safety"][name].numpy()
        kept = got != 0
        assert abs(kept.mean() - 0.5) < 0.02
        np.testing.assert_allclose(got[kept], safety[kept], rtol=1e-5, atol=1e-7)
        assert np.abs(safety[~kept]).max() <= np.abs(safety[kept]).min() + 1e-7

    # DARE masks do not depend on which tensors are computed, or in what order
    spec = spec_from_dict(graft_spec_dict(family, dare={"rate": 0.5, "seed": 3}))
    sources = open_sources(spec)
    full = compute_vectors(sources, names, torch.float32, torch.device("cpu"))["safety"]
    part = compute_vectors(sources, names[5:7], torch.float32, torch.device("cpu"))["safety"]
    assert set(part) == set(names[5:7]) and all(torch.equal(part[n], full[n]) for n in part)


def test_vectors_are_stored_in_the_working_dtype(family):
    sources = open_sources(spec_from_dict(graft_spec_dict(family)))
    vecs = compute_vectors(sources, ["model.norm.weight"], torch.bfloat16, torch.device("cpu"))
    assert vecs["safety"]["model.norm.weight"].dtype == torch.bfloat16


def _grow_vocab(path, extra: int, seed: int) -> None:
    """Add ``extra`` rows to embeddings and head, as a fine-tune adding tokens would."""
    f = path / "model.safetensors"
    tensors = load_torch(f)
    g = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[key]
        tensors[key] = torch.cat([t, torch.randn(extra, t.shape[1], generator=g)])
    save_file(tensors, f, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] += extra
    (path / "config.json").write_text(json.dumps(config))


def test_vocabulary_added_by_fine_tuning_gets_a_zero_delta(tmp_path):
    paths = build_graft_family(tmp_path, seed=20)
    _grow_vocab(paths["medical"], 8, seed=1)  # the medical fine-tune added 8 tokens
    sources = open_sources(spec_from_dict(graft_spec_dict(paths)))
    vecs = compute_vectors(sources, ["model.embed_tokens.weight"], torch.float32, torch.device("cpu"))
    me, al = Checkpoint(paths["medical"]), Checkpoint(paths["aligned"])
    key = "model.embed_tokens.weight"
    medical, safety = vecs["medical"][key], vecs["safety"][key]
    assert medical.shape == safety.shape == (104, 64)  # the anchor's (medical) rows
    assert torch.equal(medical[:96], me.load(key)[:96] - al.load(key))
    assert torch.count_nonzero(medical[96:]) == 0 and torch.count_nonzero(safety[96:]) == 0


def test_other_shape_mismatches_name_the_tensor_and_both_shapes(tmp_path):
    paths = build_graft_family(tmp_path, seed=30)
    config = tiny_llama_config()
    config.intermediate_size = 96  # same architecture, another size
    shutil.rmtree(paths["unaligned"])
    save_tiny_model(config, paths["unaligned"], seed=31)
    with pytest.raises(UserError, match=r"shape mismatch for tensor 'model.layers.0.mlp.gate_proj.weight'.*\[128, 64\] vs .*\[96, 64\]"):
        open_sources(spec_from_dict(graft_spec_dict(paths)))


def test_vector_endpoints_of_different_architectures_are_refused(tmp_path):
    paths = build_graft_family(tmp_path, seed=40)
    paths["unaligned"] = build_tiny_qwen2(tmp_path / "qwen2", seed=41)
    with pytest.raises(UserError, match="architecture mismatch: aligned is LlamaForCausalLM, unaligned is Qwen2ForCausalLM"):
        open_sources(spec_from_dict(graft_spec_dict(paths)))


def test_a_qwen2_vector_onto_a_llama_anchor_is_an_architecture_mismatch(tmp_path):
    paths = {"medical": build_tiny_llama(tmp_path / "medical", seed=50)}
    paths["unaligned"] = build_tiny_qwen2(tmp_path / "unaligned", seed=51)
    paths["aligned"] = finetuned_copy(paths["unaligned"], tmp_path / "aligned", seed=52)
    spec = graft_spec_dict(paths)
    del spec["vectors"]["medical"]
    with pytest.raises(UserError, match=r"architecture mismatch: 6 of the 27 parameters of aligned \(Qwen2ForCausalLM\)"):
        open_sources(spec_from_dict(spec))
