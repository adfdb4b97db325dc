"""Module groups: every parameter of the anchor gets exactly one group, or is frozen explicitly.

A coefficient is set per (vector, group). Groups come from user rules (regexes on model names, first match
wins, named captures fill the group name) and then a preset for what the rules leave:

``global``      one group, ``all``;
``component``   ``vision``, ``projector``, ``embed``, ``layers`` (the text layer stack), ``norm``, ``head``;
``layer``       as ``component`` with the layer stack split per layer: ``layer.0``, ``layer.1``, ...;
``layer-type``  per layer and kind: ``layer.3.attn``, ``layer.3.mlp``, ``layer.3.norm``;
``block:K``     K consecutive layers per group: ``block.0-3``, ``block.4-7``, ...

The vision tower stays one group in every preset but ``global``; rules split it when wanted. A parameter
that neither rules nor preset place is an error unless a ``frozen`` pattern names it (frozen parameters
always keep the anchor's values).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from safesearch.errors import UserError
from safesearch.graftspec import GroupSpec

PRESETS = ("global", "component", "layer", "layer-type", "block:K")

# Checked in this order: the projector sits inside Qwen2-VL's vision module (``visual.merger``).
_PROJECTOR = re.compile(r"(^|\.)(multi_modal_projector|mm_projector|visual\.merger|vision_projection)\.")
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|image_encoder)\.")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.|^output\.weight$")
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_positions)\.")
_LAYER = re.compile(r"(^|\.)(layers|h|blocks)\.(\d+)\.(.*)$")
_NORM = re.compile(r"(^|\.)(norm|ln_f|final_layernorm|final_layer_norm)\.")
_ATTN = re.compile(r"attn|attention")
_MLP = re.compile(r"mlp|feed_forward|ffn")
_LAYER_NORM = re.compile(r"norm|(^|[._])ln")


@dataclass(frozen=True)
class Grouping:
    """``groups``: group name -> its parameters, in the model's order; ``frozen``: parameters left out."""

    groups: dict[str, list[str]]
    frozen: list[str]

    @property
    def group_of(self) -> dict[str, str]:
        return {p: g for g, ps in self.groups.items() for p in ps}


def check_preset(preset: str, where: str = "preset") -> int | None:
    """Validate a preset name; returns K for ``block:K``."""
    if preset in ("global", "component", "layer", "layer-type"):
        return None
    m = re.fullmatch(r"block:(\d+)", preset)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise UserError(f"{where}: unknown group preset {preset!r} (expected one of {', '.join(PRESETS)})")


def preset_group(name: str, preset: str) -> str | None:
    """The group ``preset`` gives parameter ``name``, or None when the preset cannot place it."""
    k = check_preset(preset)
    if preset == "global":
        return "all"
    if _PROJECTOR.search(name):
        return "projector"
    if _VISION.search(name):
        return "vision"
    if _HEAD.search(name):
        return "head"
    if _EMBED.search(name):
        return "embed"
    m = _LAYER.search(name)
    if m:
        i, rest = int(m.group(3)), m.group(4)
        if preset == "component":
            return "layers"
        if preset == "layer":
            return f"layer.{i}"
        if k is not None:
            return f"block.{i // k * k}-{i // k * k + k - 1}"
        # The module holding the parameter decides first: post_attention_layernorm is a norm.
        module = rest.rsplit(".", 2)[-2] if "." in rest else rest
        if _LAYER_NORM.search(module):
            return f"layer.{i}.norm"
        for kind, pattern in (("attn", _ATTN), ("mlp", _MLP)):
            if pattern.search(rest):
                return f"layer.{i}.{kind}"
        return None
    if _NORM.search(name):
        return "norm"
    return None


def group_parameters(names: Iterable[str], spec: GroupSpec) -> Grouping:
    """Place every parameter in one group (rules, then preset) or in ``frozen``; errors name the culprit."""
    names = list(names)
    frozen_res = [re.compile(p) for p in spec.frozen]
    rules = [(re.compile(r.pattern), r.group) for r in spec.rules]
    rule_hits = [0] * len(rules)
    frozen_hits = [0] * len(frozen_res)
    groups: dict[str, list[str]] = {}
    frozen: list[str] = []
    for name in names:
        hit = next((i for i, f in enumerate(frozen_res) if f.search(name)), None)
        if hit is not None:
            frozen_hits[hit] += 1
            frozen.append(name)
            continue
        group = None
        for i, (pattern, template) in enumerate(rules):
            m = pattern.search(name)
            if m:
                rule_hits[i] += 1
                group = template.format(**{k: v or "" for k, v in m.groupdict().items()})
                break
        if group is None and spec.preset is not None:
            group = preset_group(name, spec.preset)
        if group is None:
            how = f"preset {spec.preset!r}" if spec.preset else "no preset"
            raise UserError(
                f"{spec.where}: parameter {name!r} is in no group ({len(rules)} rules and {how} do not place "
                "it); add a groups.rules entry for it or list it under groups.frozen"
            )
        groups.setdefault(group, []).append(name)
    for i, n in enumerate(rule_hits):
        if n == 0:
            r = spec.rules[i]
            raise UserError(
                f"{spec.where}.rules[{i}]: pattern {r.pattern!r} places no parameter (none matches before an earlier "
                "rule does)"
            )
    for i, n in enumerate(frozen_hits):
        if n == 0:
            raise UserError(f"{spec.where}.frozen[{i}]: pattern {spec.frozen[i]!r} matches no parameter")
    return Grouping(groups, frozen)
