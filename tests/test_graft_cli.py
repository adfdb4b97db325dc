"""``safesearch groups`` and ``safesearch merge``: the toy spec end to end, and every bad input as one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_run import run_cli
from safetensors.torch import load_file, save_file
from tiny_models import (
    build_graft_family,
    build_tiny_qwen2,
    finetuned_copy,
    graft_spec_dict,
    load_tiny_model,
    save_tiny_model,
    tiny_llama_config,
)

from safesearch.graftspec import load_spec
from safesearch.merging import Merger

REPO = Path(__file__).resolve().parents[1]


run = run_cli


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The example spec in a copy of the repository layout, over a miniature toy world."""
    root = tmp_path_factory.mktemp("toy")
    (root / "studies").mkdir()
    shutil.copy(REPO / "studies/toy-graft.yaml", root / "studies/toy-graft.yaml")
    build_graft_family(root / "storage/toyworld", seed=300)
    return root / "studies/toy-graft.yaml"


def test_groups_prints_each_group_with_its_parameter_count(toy, capsys):
    code, out, err = run(capsys, "groups", toy)
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    assert [g for g in rows if g not in ("group", "(frozen)", "total")] == ["embed", "layer.0", "layer.1", "norm", "head"]
    assert "6,144" in rows["embed"] and "safety, medical" in rows["embed"]  # 96 x 64
    assert "36,992" in rows["layer.0"]  # q, o 64x64; k, v 32x64; mlp 3 x 128x64; 2 norms
    total = sum(p.numel() for p in load_tiny_model(load_spec(toy).anchor_checkpoint.path).parameters())
    assert f"{total:,}" in rows["total"]


def test_merge_exports_what_the_in_memory_merger_computes(toy, capsys, tmp_path):
    coef = tmp_path / "coef.json"
    coef.write_text(json.dumps({"safety": {"*": 1.0, "layer.1": 1.5}, "medical": {"*": 0.0, "head": -0.1}}))
    code, out, err = run(capsys, "merge", toy, "--coef", coef, "--out", tmp_path / "merged")
    assert code == 0, err
    assert "wrote" in out
    spec = load_spec(toy)
    merger = Merger.from_spec(spec, device="cpu")
    model = load_tiny_model(spec.anchor_checkpoint.path)
    merger.apply(model, merger.parse(json.loads(coef.read_text())))
    ids = torch.tensor([[2, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(load_tiny_model(tmp_path / "merged")(input_ids=ids).logits, model(input_ids=ids).logits)
    code, _, err = run(capsys, "merge", toy, "--coef", coef, "--out", tmp_path / "merged")
    assert code != 0 and err == f"error: --out {tmp_path / 'merged'}: already exists (pass --overwrite to replace it)\n"
    assert run(capsys, "merge", toy, "--coef", coef, "--out", tmp_path / "merged", "--overwrite")[0] == 0


def test_merge_copies_only_what_a_checkpoint_needs_and_names_the_rest(toy, capsys, tmp_path):
    """The anchor's folder as users keep it: a README, training arguments, an optimizer state beside the
    model. The export copies the config, tokenizer and chat template, leaves the rest out, and says so."""
    spec = load_spec(toy)
    anchor = Path(spec.anchor_checkpoint.path)
    stray = {"README.md": "# my model", "training_args.json": "{}", "notes.txt": "x", "optimizer.pt": "x"}
    for name, text in stray.items():
        (anchor / name).write_text(text)
    (anchor / "chat_template.jinja").write_text("{{ messages }}")
    try:
        coef = tmp_path / "coef.json"
        coef.write_text(json.dumps({"safety": {"*": 0.5}, "medical": {"*": 0.0}}))
        code, out, err = run(capsys, "merge", toy, "--coef", coef, "--out", tmp_path / "merged")
        assert code == 0, err
        written = {f.name for f in (tmp_path / "merged").iterdir()}
        assert not written & set(stray) and {"config.json", "chat_template.jinja"} <= written
        assert "README.md, notes.txt, optimizer.pt, training_args.json" in err, err
        files = json.loads((tmp_path / "merged" / "safesearch.json").read_text())["anchor_files"]
        assert files["left_out"] == ["README.md", "notes.txt", "optimizer.pt", "training_args.json"]
        assert "config.json" in files["copied"] and "chat_template.jinja" in files["copied"]
    finally:
        for name in (*stray, "chat_template.jinja"):
            (anchor / name).unlink()


def test_needed_files_keep_a_models_own_code() -> None:
    from safesearch.export import needed_files

    names = ["config.json", "modeling_x.py", "README.md", "model.safetensors", "tokenizer.json", "x.tiktoken"]
    assert needed_files(names, {}) == (["config.json", "tokenizer.json", "x.tiktoken"], ["README.md", "modeling_x.py"])
    assert needed_files(names, {"auto_map": {"AutoModel": "modeling_x.X"}})[0] == [
        "config.json", "modeling_x.py", "tokenizer.json", "x.tiktoken"]


# -- bad input: each a one-line error and a non-zero exit ---------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_graft_family(tmp_path_factory.mktemp("bad"), seed=400)


def _copy(family, tmp_path, name):
    paths = dict(family)
    paths[name] = Path(shutil.copytree(family[name], tmp_path / name))
    return paths


def _truncate(paths, tmp_path):
    p = _copy(paths, tmp_path, "aligned")
    f = p["aligned"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    return graft_spec_dict(p), None


def _missing_shard(paths, tmp_path):
    p = _copy(paths, tmp_path, "aligned")
    keys = list(load_file(p["aligned"] / "model.safetensors"))
    wm = {k: "model.safetensors" for k in keys} | {keys[-1]: "model-00002-of-00002.safetensors"}
    (p["aligned"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return graft_spec_dict(p), None


def _pickle(paths, tmp_path):
    p = _copy(paths, tmp_path, "unaligned")
    (p["unaligned"] / "model.safetensors").unlink()
    (p["unaligned"] / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    return graft_spec_dict(p), None


def _no_weights(paths, tmp_path):
    p = _copy(paths, tmp_path, "unaligned")
    (p["unaligned"] / "model.safetensors").unlink()
    return graft_spec_dict(p), None


def _shape(paths, tmp_path):
    p = dict(paths)
    config = tiny_llama_config()
    config.num_attention_heads, config.num_key_value_heads = 1, 1  # k/v/q projections change shape
    p["unaligned"] = save_tiny_model(config, tmp_path / "unaligned", seed=1)
    return graft_spec_dict(p), None


def _architecture(paths, tmp_path):
    p = dict(paths)
    p["unaligned"] = build_tiny_qwen2(tmp_path / "q", seed=2)
    p["aligned"] = finetuned_copy(p["unaligned"], tmp_path / "qa", seed=3)
    return graft_spec_dict(p), None


def _corrupt_header(paths, tmp_path):
    p = _copy(paths, tmp_path, "medical")
    tensors = load_file(p["medical"] / "model.safetensors")
    save_file(tensors, p["medical"] / "model.safetensors")
    raw = bytearray((p["medical"] / "model.safetensors").read_bytes())
    raw[8:12] = b"\xff\xfe\xfd\xfc"
    (p["medical"] / "model.safetensors").write_bytes(bytes(raw))
    return graft_spec_dict(p), None


BAD = {
    "missing directory": (lambda f, t: (graft_spec_dict(f | {"aligned": t / "nowhere"}), None), r"checkpoint aligned \(.*nowhere\): does not exist"),
    "no safetensors file": (_no_weights, r"checkpoint unaligned \(.*unaligned\): no model.safetensors or model.safetensors.index.json"),
    "truncated safetensors": (_truncate, "corrupt safetensors file .*truncated"),
    "corrupt safetensors header": (_corrupt_header, "corrupt safetensors file"),
    "index names a missing shard": (_missing_shard, "names shard 'model-00002-of-00002.safetensors'.* which is missing"),
    "pickle weights": (_pickle, r"checkpoint unaligned \(.*unaligned\): holds pickle weights \(pytorch_model.bin\).*convert"),
    "shape mismatch": (_shape, r"shape mismatch for tensor 'model.layers.0.self_attn.q_proj.weight': .*\[64, 64\] vs .*\[32, 64\]"),
    "architecture mismatch": (_architecture, "architecture mismatch: .* is Qwen2ForCausalLM"),
    "unknown preset": (lambda f, t: (graft_spec_dict(f, groups={"preset": "layers"}), None), "groups.preset: unknown group preset 'layers'"),
    "regex places nothing": (
        lambda f, t: (graft_spec_dict(f, groups={"rules": [{"pattern": "q_proj", "group": "q"}, {"pattern": "qkv", "group": "x"}, {"pattern": ".", "group": "rest"}]}), None),
        r"groups.rules\[1\]: pattern 'qkv' places no parameter",
    ),
    "coefficient for an unknown vector": (lambda f, t: (graft_spec_dict(f), {"safty": {"*": 1}}), "unknown vector 'safty'"),
    "coefficient for an unknown group": (lambda f, t: (graft_spec_dict(f), {"safety": {"layer.7": 1}}), "safety: unknown group 'layer.7'"),
    "non-numeric coefficient": (lambda f, t: (graft_spec_dict(f), {"safety": {"layer.0": "high"}}), "safety.layer.0: coefficient 'high' is not a finite number"),
    "boolean coefficient": (lambda f, t: (graft_spec_dict(f), {"medical": {"*": True}}), r"medical.\*: coefficient True is not a finite number"),
    "unknown spec field": (lambda f, t: ({**graft_spec_dict(f), "vectorz": {}}, None), "unknown field 'vectorz'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_a_non_zero_exit(case, family, tmp_path, capsys):
    make, expected = BAD[case]
    spec, coefs = make(family, tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(spec, default=str))))
    (tmp_path / "coef.json").write_text(json.dumps(coefs if coefs is not None else {"safety": {"*": 1.0}}))
    code, out, err = run(capsys, "merge", tmp_path / "spec.yaml", "--coef", tmp_path / "coef.json", "--out", tmp_path / "out")
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()
    if coefs is None:  # the spec's errors also stop `groups`, which reads only headers
        code, _, err = run(capsys, "groups", tmp_path / "spec.yaml")
        assert code != 0 and err.count("\n") == 1 and re.search(expected, err), err


def test_missing_spec_and_coefficient_files(family, tmp_path, capsys):
    code, _, err = run(capsys, "groups", tmp_path / "none.yaml")
    assert code != 0 and err == f"error: graft or study spec {tmp_path / 'none.yaml'}: does not exist\n"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(graft_spec_dict(family), default=str))))
    code, _, err = run(capsys, "merge", tmp_path / "spec.yaml", "--coef", tmp_path / "c.json", "--out", tmp_path / "o")
    assert code != 0 and err == f"error: coefficient file {tmp_path / 'c.json'}: does not exist\n"
    (tmp_path / "c.json").write_text("{safety: 1}")
    code, _, err = run(capsys, "merge", tmp_path / "spec.yaml", "--coef", tmp_path / "c.json", "--out", tmp_path / "o")
    assert code != 0 and err.startswith(f"error: coefficient file {tmp_path / 'c.json'}:1: malformed JSON") and err.count("\n") == 1
