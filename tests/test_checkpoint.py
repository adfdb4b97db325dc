"""Lazy checkpoint access: headers without loading, one tensor at a time, refusals, model names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tiny_models import (
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_qwen2_vl,
    load_tiny_model,
    save_tiny_model,
    tiny_llama_config,
)

from safesearch.checkpoint import Checkpoint, sha256_file
from safesearch.errors import UserError


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("ck") / "llama", seed=0)


def test_headers_list_names_shapes_dtypes_and_load_reads_one_tensor(llama):
    ckpt = Checkpoint(llama)
    with safe_open(str(llama / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert sorted(ckpt.keys()) == sorted(keys)
        for key in keys:
            t = f.get_tensor(key)
            assert ckpt.tensors[key].shape == tuple(t.shape)
            assert ckpt.tensors[key].dtype == t.dtype
        key = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(ckpt.load(key), f.get_tensor(key))
    assert ckpt.load(key, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert ckpt.architecture == "LlamaForCausalLM"


def test_load_flat_reads_a_range_of_elements(llama):
    ckpt = Checkpoint(llama)
    key = "model.layers.1.mlp.up_proj.weight"
    whole = ckpt.load(key).reshape(-1)
    for start, stop in ((0, whole.numel()), (5, 77), (whole.numel() - 3, whole.numel()), (9, 9)):
        assert torch.equal(ckpt.load_flat(key, start, stop), whole[start:stop])
    with pytest.raises(IndexError):
        ckpt.load_flat(key, 0, whole.numel() + 1)


def test_a_file_truncated_after_opening_fails_as_a_user_error(llama, tmp_path):
    shutil.copytree(llama, tmp_path / "m")
    ckpt = Checkpoint(tmp_path / "m")
    with (tmp_path / "m" / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"cannot read tensor .*ends \d+ bytes early"):
        ckpt.load(max(ckpt.tensors, key=lambda k: ckpt.tensors[k].offset))


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    model = load_tiny_model(build_tiny_llama(tmp_path / "one", seed=1))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, single = Checkpoint(tmp_path / "sharded"), Checkpoint(tmp_path / "one")
    assert len({i.file for i in sharded.tensors.values()}) > 1
    assert set(sharded.keys()) == set(single.keys())
    for key in single.tensors:
        assert torch.equal(sharded.load(key), single.load(key))


def test_model_names_of_image_text_checkpoints_are_the_live_parameter_names(tmp_path):
    for build in (build_tiny_llava, build_tiny_qwen2_vl):
        path = build(tmp_path / build.__name__, seed=2)
        layout = Checkpoint(path).layout
        model = load_tiny_model(path)
        live = dict(model.named_parameters())
        assert list(layout.parameters) == list(live)
        assert {n: tuple(p.shape) for n, p in live.items()} == layout.parameters
        # transformers 5 saves the language model under legacy keys: the layout renames them.
        assert any(n != k for n, k in layout.names.items())
        ckpt = Checkpoint(path)
        for name, key in layout.names.items():
            assert torch.equal(ckpt.load(key), live[name].detach())


def test_tied_embeddings_appear_once_with_an_alias(tmp_path):
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    layout = Checkpoint(save_tiny_model(config, tmp_path / "tied")).layout
    assert "lm_head.weight" not in layout.parameters
    assert layout.aliases == {"lm_head.weight": "model.embed_tokens.weight"}


def test_sha256_covers_every_file(llama):
    digests = Checkpoint(llama).sha256()
    assert set(digests) == {p.name for p in llama.iterdir()}
    assert digests["model.safetensors"] == sha256_file(llama / "model.safetensors")


def _copy(llama, tmp_path, name="copy"):
    return shutil.copytree(llama, tmp_path / name)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        Checkpoint(tmp_path / "empty")


def test_pickle_weights_are_refused_with_how_to_convert(llama, tmp_path):
    d = _copy(llama, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(UserError, match=r"pickle weights \(pytorch_model.bin\).*save_pretrained"):
        Checkpoint(d)


def test_truncated_safetensors_is_corrupt(llama, tmp_path):
    d = _copy(llama, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt safetensors file.*truncated"):
        Checkpoint(d)


def test_garbage_safetensors_is_corrupt(llama, tmp_path):
    d = _copy(llama, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="corrupt safetensors file"):
        Checkpoint(d)


def test_index_naming_a_missing_shard_is_refused(llama, tmp_path):
    d = _copy(llama, tmp_path)
    keys = Checkpoint(d).keys()
    weight_map = {k: "model.safetensors" for k in keys}
    weight_map[keys[0]] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="names shard 'model-00002-of-00002.safetensors'.*missing"):
        Checkpoint(d)


def test_index_naming_a_tensor_its_shard_lacks_is_refused(llama, tmp_path):
    d = _copy(llama, tmp_path)
    weight_map = dict.fromkeys(Checkpoint(d).tensors, "model.safetensors") | {"extra.weight": "model.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="'extra.weight'.*does not hold it"):
        Checkpoint(d)


def test_checkpoint_lacking_a_parameter_of_its_config_is_refused(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(llama, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks parameter 'model.norm.weight'"):
        _ = Checkpoint(d).layout
