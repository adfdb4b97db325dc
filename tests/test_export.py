"""Exports: reloaded logits identical to the in-memory merge, files and provenance, atomicity."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch
from safetensors import safe_open
from tiny_models import (
    build_graft_family,
    build_tiny_qwen2_vl,
    finetuned_copy,
    graft_spec_dict,
    load_tiny_model,
)

from safesearch import __version__
from safesearch.checkpoint import Checkpoint, sha256_file
from safesearch.errors import UserError
from safesearch.export import export_merged
from safesearch.graftspec import spec_from_dict
from safesearch.merging import Merger

IDS = torch.tensor([[2, 5, 9, 11, 7, 3]])
COEFS = {"safety": {"*": 0.8, "layer.1": 1.6}, "medical": {"*": -0.2}}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_graft_family(tmp_path_factory.mktemp("export"), seed=200)


@pytest.fixture(scope="module")
def merger(family):
    return Merger.from_spec(spec_from_dict(graft_spec_dict(family)), device="cpu")


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_export_reloads_with_logits_identical_to_the_in_memory_merge(family, merger, tmp_path):
    coefs = merger.parse(COEFS)
    model = load_tiny_model(family["medical"])
    merger.apply(model, coefs)
    live = _logits(model)
    # merged again by the exporter, and read from the live parameters: both equal what was scored
    export_merged(merger, coefs, tmp_path / "merged")
    export_merged(merger, coefs, tmp_path / "from-live", params=dict(model.named_parameters()))
    for out in ("merged", "from-live"):
        reloaded = load_tiny_model(tmp_path / out)  # AutoModelForCausalLM
        assert type(reloaded).__name__ == "LlamaForCausalLM"
        assert torch.equal(_logits(reloaded), live)
    assert sha256_file(tmp_path / "merged/model.safetensors") == sha256_file(tmp_path / "from-live/model.safetensors")


def test_image_text_export_reloads_with_identical_logits(tmp_path):
    """A Qwen2-VL medical model with its own safety vector; reloaded with AutoModelForImageTextToText."""
    unaligned = build_tiny_qwen2_vl(tmp_path / "unaligned", seed=201)
    aligned = finetuned_copy(unaligned, tmp_path / "aligned", seed=202)
    medical = finetuned_copy(aligned, tmp_path / "medical", seed=203)
    paths = {"unaligned": unaligned, "aligned": aligned, "medical": medical}
    m = Merger.from_spec(spec_from_dict(graft_spec_dict(paths, groups={"preset": "component"})), device="cpu")
    coefs = m.parse({"safety": {"*": 1.0, "vision": 0.5}, "medical": {"layers": -0.5}})
    model = load_tiny_model(medical)
    m.apply(model, coefs)
    export_merged(m, coefs, tmp_path / "out")
    reloaded = load_tiny_model(tmp_path / "out")
    assert type(reloaded).__name__ == "Qwen2VLForConditionalGeneration"
    assert torch.equal(_logits(reloaded), _logits(model))
    ref = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, ref[name]), name
    # the export keeps the anchor's own disk keys
    assert set(Checkpoint(tmp_path / "out").keys()) == set(Checkpoint(medical).keys())


def test_export_copies_configs_tokenizer_and_records_provenance(family, merger, tmp_path):
    coefs = merger.parse(COEFS)
    out = export_merged(merger, coefs, tmp_path / "out")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (family["medical"] / f).read_bytes(), f
    info = json.loads((out / "safesearch.json").read_text())
    assert info["safesearch_version"] == __version__
    assert info["coefficients"] == coefs
    assert info["spec"]["vectors"] == {"safety": {"diff": "aligned - unaligned"}, "medical": {"diff": "medical - aligned"}}
    assert info["spec"]["anchor"] == "medical"
    for name, path in family.items():
        assert info["inputs"][name]["sha256"] == {p.name: sha256_file(p) for p in path.iterdir()}
    assert info["outputs"]["sha256"] == {"model.safetensors": sha256_file(out / "model.safetensors")}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_export(family, merger, tmp_path):
    coefs = merger.parse(COEFS)
    out = export_merged(merger, coefs, tmp_path / "out", shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model = load_tiny_model(family["medical"])
    merger.apply(model, coefs)
    assert torch.equal(_logits(load_tiny_model(out)), _logits(model))


def test_bf16_export_matches_the_bf16_merge(family, tmp_path):
    m = Merger.from_spec(spec_from_dict(graft_spec_dict(family)), device="cpu", dtype=torch.bfloat16)
    coefs = m.parse(COEFS)
    model = load_tiny_model(family["medical"], dtype=torch.bfloat16)
    m.apply(model, coefs)
    out = export_merged(m, coefs, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_tiny_model(out, dtype=torch.bfloat16)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_existing_output_is_refused_unless_overwrite(family, merger, tmp_path):
    coefs = merger.parse(COEFS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        export_merged(merger, coefs, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_merged(merger, coefs, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _InterruptAfter(Mapping):
    """The live parameters, but Ctrl-C strikes after ``n`` reads (an export interrupted half-way)."""

    def __init__(self, params, n):
        self.params, self.n = params, n

    def __getitem__(self, key):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.params[key]

    def __iter__(self):
        return iter(self.params)

    def __len__(self):
        return len(self.params)


def test_interrupted_export_leaves_nothing(family, merger, tmp_path):
    coefs = merger.parse(COEFS)
    model = load_tiny_model(family["medical"])
    merger.apply(model, coefs)
    with pytest.raises(KeyboardInterrupt):
        export_merged(merger, coefs, tmp_path / "out", params=_InterruptAfter(dict(model.named_parameters()), 5))
    assert list(tmp_path.iterdir()) == []


def test_a_merged_tensor_with_nan_or_inf_is_refused_and_nothing_is_written(family, merger, tmp_path):
    coefs = merger.parse(COEFS)
    model = load_tiny_model(family["medical"])
    merger.apply(model, coefs)
    params = dict(model.named_parameters())
    name = next(iter(merger.anchor))
    broken = {**params, name: params[name].detach().clone().index_fill_(0, torch.tensor([0]), float("inf"))}
    with pytest.raises(UserError, match=r"merged tensor '.*' holds NaN or inf values .*nothing was written"):
        export_merged(merger, coefs, tmp_path / "out", params=broken)
    assert list(tmp_path.iterdir()) == []


def test_coefficients_that_would_overflow_the_dtype_are_refused_before_merging(merger):
    merger.check_bounds(merger.parse(COEFS), "c.json")  # ordinary coefficients pass
    with pytest.raises(UserError, match=r"c.json: safety.layer.1: a coefficient of 1e\+39 .* beyond the largest "
                                        r"float32 value"):
        merger.check_bounds(merger.parse({"safety": {"layer.1": 1e39}}), "c.json")
    with pytest.raises(UserError, match=r"study.yaml: search.medical.embed: a coefficient of 1e\+40"):
        merger.check_bounds(merger.parse({"medical": {"*": 1e40}}), "study.yaml", prefix="search.")


def test_what_a_killed_export_left_is_removed_by_the_next_export_to_that_out(merger, tmp_path):
    for name in (".out.partial-0badf00d", ".out.old-0badf00d", ".other.partial-0badf00d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    export_merged(merger, merger.parse(COEFS), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-0badf00d", "out"]
