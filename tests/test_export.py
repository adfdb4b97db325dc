"""Exports: reloaded logits identical to the in-memory merge, files and provenance, atomicity."""

from __future__ import annotations

import json
import shutil
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
from safesearch.digests import BackgroundDigests, folder_digests, spec_digests
from safesearch.errors import UserError
from safesearch.export import export_merged
from safesearch.graftspec import spec_from_dict
from safesearch.merging import Merger
from safesearch.streaming import StreamingMerger

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


# -- the streaming export (what `safesearch merge` and `safesearch export` run) ------------------------


@pytest.mark.parametrize(
    ("options", "dtype", "chunk"),
    [
        ({}, torch.float32, None),
        ({}, torch.float32, 64),  # streamed in ranges of 4 x 64 elements: many parts per tensor
        ({}, torch.bfloat16, 64),
        ({"orthogonalize": "medical", "trim": 0.5, "dare": {"rate": 0.3, "seed": 4}}, torch.float32, 64),
    ],
)
def test_streaming_export_writes_the_bytes_of_the_resident_one(family, tmp_path, options, dtype, chunk):
    spec = spec_from_dict(graft_spec_dict(family, **options))
    resident = Merger.from_spec(spec, device="cpu", dtype=dtype)
    streaming = StreamingMerger.from_spec(spec, device="cpu", dtype=dtype, chunk=chunk)
    assert streaming.names == resident.names and streaming.groups() == resident.groups()
    coefs = resident.parse(COEFS)
    a = export_merged(resident, coefs, tmp_path / "resident")
    b = export_merged(streaming, coefs, tmp_path / "streaming", shard_bytes=40_000 if chunk else 10**9)
    expected = {}
    for f in a.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            expected.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    got = {}
    for f in b.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    assert expected.keys() == got.keys()
    for k, t in expected.items():
        assert t.dtype == got[k].dtype and torch.equal(t.view(torch.uint8), got[k].view(torch.uint8)), k
    if not chunk:  # one shard each: the very file
        assert sha256_file(a / "model.safetensors") == sha256_file(b / "model.safetensors")


def test_streaming_export_records_the_digests_hashed_in_the_background(family, tmp_path):
    spec = spec_from_dict(graft_spec_dict(family))
    digests = spec_digests(spec)
    m = StreamingMerger.from_spec(spec, device="cpu")
    out = export_merged(m, m.parse(COEFS), tmp_path / "out", digests=digests)
    info = json.loads((out / "safesearch.json").read_text())
    for name, path in family.items():
        assert info["inputs"][name]["sha256"] == folder_digests(path) == {p.name: sha256_file(p) for p in path.iterdir()}


def test_background_digests_raise_what_hashing_met(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text("{}")
    digests = BackgroundDigests([tmp_path / "a", tmp_path / "gone"])
    assert digests.get(tmp_path / "a") == {"x.json": sha256_file(tmp_path / "a" / "x.json")}
    with pytest.raises(FileNotFoundError):
        digests.get(tmp_path / "gone")


def test_interrupted_streaming_export_leaves_nothing(family, tmp_path, monkeypatch):
    m = StreamingMerger.from_spec(spec_from_dict(graft_spec_dict(family)), device="cpu", chunk=64)
    calls = iter(range(10**6))
    merge = m.merge_loaded

    def interrupted(*args, **kwargs):
        if next(calls) == 7:
            raise KeyboardInterrupt
        return merge(*args, **kwargs)

    monkeypatch.setattr(m, "merge_loaded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_merged(m, m.parse(COEFS), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_input_that_breaks_mid_export_fails_as_a_user_error_and_nothing_is_written(family, tmp_path):
    for name, path in family.items():
        shutil.copytree(path, tmp_path / "in" / name)
    paths = {name: tmp_path / "in" / name for name in family}
    m = StreamingMerger.from_spec(spec_from_dict(graft_spec_dict(paths)), device="cpu")
    with (paths["aligned"] / "model.safetensors").open("r+b") as f:  # read on the read-ahead thread
        f.truncate(2000)
    with pytest.raises(UserError, match="cannot read tensor"):
        export_merged(m, m.parse(COEFS), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_streaming_export_refuses_coefficients_beyond_the_dtype_and_merges_that_overflow(family, tmp_path,
                                                                                         monkeypatch):
    m = StreamingMerger.from_spec(spec_from_dict(graft_spec_dict(family)), device="cpu")
    m.check_bounds(m.parse(COEFS), "c.json")
    with pytest.raises(UserError, match=r"c.json: search.safety.layer.1: a coefficient of 1e\+39 is beyond the "
                                        r"largest float32 value"):
        m.check_bounds(m.parse({"safety": {"layer.1": -1e39}}), "c.json", prefix="search.")
    load = m.load

    def overflowing(name, part=None):
        anchor, taus = load(name, part)
        return anchor, {v: t.clone().fill_(3e38) for v, t in taus.items()}

    monkeypatch.setattr(m, "load", overflowing)
    with pytest.raises(UserError, match=r"merged tensor '.*' holds NaN or inf values .*nothing was written"):
        export_merged(m, m.parse({"safety": {"*": 1.0}, "medical": {"*": 1.0}}), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
