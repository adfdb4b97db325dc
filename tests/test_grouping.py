"""Module groups: presets, regex rules with named captures, frozen parameters, and the errors."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_llama, build_tiny_llava, build_tiny_qwen2_vl

from safesearch.checkpoint import Checkpoint
from safesearch.errors import UserError
from safesearch.graftspec import GroupRule, GroupSpec, spec_from_dict
from safesearch.grouping import group_parameters


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    return {
        "llama": list(Checkpoint(build_tiny_llama(root / "llama")).layout.parameters),
        "llava": list(Checkpoint(build_tiny_llava(root / "llava")).layout.parameters),
        "qwen2_vl": list(Checkpoint(build_tiny_qwen2_vl(root / "qwen2_vl")).layout.parameters),
    }


def _groups(names, **kw):
    g = group_parameters(names, GroupSpec(**kw))
    placed = [p for ps in g.groups.values() for p in ps] + g.frozen
    assert sorted(placed) == sorted(names)  # each parameter exactly once
    return g


def test_presets_on_a_text_model(names):
    llama = names["llama"]
    assert list(_groups(llama, preset="global").groups) == ["all"]
    assert list(_groups(llama, preset="component").groups) == ["embed", "layers", "norm", "head"]
    layer = _groups(llama, preset="layer").groups
    assert list(layer) == ["embed", "layer.0", "layer.1", "norm", "head"]
    assert len(layer["layer.1"]) == 9
    types = _groups(llama, preset="layer-type").groups
    assert list(types) == [
        "embed", "layer.0.attn", "layer.0.mlp", "layer.0.norm", "layer.1.attn", "layer.1.mlp", "layer.1.norm", "norm", "head"
    ]
    assert sorted(types["layer.0.norm"]) == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
    assert list(_groups(llama, preset="block:2").groups) == ["embed", "block.0-1", "norm", "head"]
    assert list(_groups(llama, preset="block:1").groups) == ["embed", "block.0-0", "block.1-1", "norm", "head"]


def test_components_of_image_text_models(names):
    llava = _groups(names["llava"], preset="component").groups
    assert list(llava) == ["vision", "projector", "embed", "layers", "norm", "head"]
    assert all(n.startswith("model.multi_modal_projector.") for n in llava["projector"])
    qwen = _groups(names["qwen2_vl"], preset="layer").groups
    assert list(qwen) == ["vision", "projector", "embed", "layer.0", "layer.1", "norm", "head"]
    assert all(n.startswith("model.visual.merger.") for n in qwen["projector"])
    assert all(n.startswith("model.language_model.layers.0.") for n in qwen["layer.0"])


def test_rules_with_named_captures_come_before_the_preset(names):
    rules = (
        GroupRule(r"layers\.(?P<i>\d+)\.mlp\.", "mlp.{i}"),
        GroupRule(r"vision_tower\.encoder\.layers\.(?P<i>\d+)\.", "vision.{i}"),
    )
    g = _groups(names["llava"], preset="component", rules=rules).groups
    assert {"mlp.0", "mlp.1", "vision.0", "vision", "layers"} <= set(g)
    assert len(g["mlp.1"]) == 3
    assert all("mlp" not in n for n in g["layers"])


def test_unplaced_parameter_is_an_error_unless_frozen(names):
    rules = (GroupRule(r"layers\.(?P<i>\d+)\.", "layer.{i}"),)
    with pytest.raises(UserError, match=r"parameter 'model.embed_tokens.weight' is in no group.*groups.frozen"):
        group_parameters(names["llama"], GroupSpec(preset=None, rules=rules))
    g = group_parameters(names["llama"], GroupSpec(preset=None, rules=rules, frozen=("embed_tokens", r"^model\.norm\.", "lm_head")))
    assert list(g.groups) == ["layer.0", "layer.1"]
    assert sorted(g.frozen) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_a_regex_that_places_nothing_is_an_error(names):
    with pytest.raises(UserError, match=r"groups.rules\[1\]: pattern 'cross_attn' places no parameter"):
        group_parameters(names["llama"], GroupSpec(rules=(GroupRule("mlp", "mlp"), GroupRule("cross_attn", "x"))))
    with pytest.raises(UserError, match=r"groups.rules\[1\].*places no parameter"):  # shadowed by rule 0
        group_parameters(names["llama"], GroupSpec(rules=(GroupRule("mlp", "mlp"), GroupRule("mlp.up", "up"))))
    with pytest.raises(UserError, match=r"groups.frozen\[0\]: pattern 'vision' matches no parameter"):
        group_parameters(names["llama"], GroupSpec(frozen=("vision",)))


def _spec(groups):
    return {"anchor": "a", "checkpoints": {"a": "x", "b": "y"}, "vectors": {"v": {"diff": "a - b"}}, "groups": groups}


def test_spec_validates_presets_and_rules():
    assert spec_from_dict(_spec({"preset": "block:4"})).groups.preset == "block:4"
    with pytest.raises(UserError, match=r"groups.preset: unknown group preset 'per-layer'"):
        spec_from_dict(_spec({"preset": "per-layer"}))
    with pytest.raises(UserError, match=r"unknown group preset 'block:0'"):
        spec_from_dict(_spec({"preset": "block:0"}))
    with pytest.raises(UserError, match=r"rules\[0\].group: 'l.\{j\}' uses \['j'\]"):
        spec_from_dict(_spec({"rules": [{"pattern": r"layers\.(?P<i>\d+)", "group": "l.{j}"}]}))
    with pytest.raises(UserError, match=r"rules\[0\].pattern: '\(' is not a valid regular expression"):
        spec_from_dict(_spec({"rules": [{"pattern": "(", "group": "g"}]}))
    # rules without a preset: the rules alone place everything
    assert spec_from_dict(_spec({"rules": [{"pattern": ".", "group": "all"}]})).groups.preset is None
