"""The graft spec: which checkpoints, which vectors, which module groups. Validated once, here.

A spec is YAML (or the same structure as a dict, so that a study spec can embed it)::

    anchor: medical                  # the checkpoint the vectors are grafted onto (a name below)
    checkpoints:                     # name: directory, or name: {path: ..., prefix_map: {...}}
      aligned: ../storage/toyworld/aligned
      unaligned: ../storage/toyworld/unaligned
      medical: ../storage/toyworld/medical
      # A text-only LLM's names put onto the language model inside an image-text anchor:
      # llm: {path: /models/Qwen2.5-7B-Instruct, prefix_map: {"model.": "model.language_model."}}
    vectors:                         # tau = A - B, computed once per tensor
      safety:
        diff: aligned - unaligned
        orthogonalize: medical       # Gram-Schmidt: remove the medical vector's direction, tensor by tensor
      medical:
        diff: medical - aligned
        trim: 0.2                    # optional, TIES-style: keep the 20% largest magnitudes of each tensor
        dare: {rate: 0.5, seed: 0}   # optional: drop each entry with probability rate, rescale by 1/(1-rate)
    groups:
      preset: layer                  # global | component | layer | layer-type | block:K
      rules:                         # optional, tried first, first match wins (re.search on model names);
        - pattern: 'layers\\.(?P<i>\\d+)\\.mlp\\.'      # named captures fill the group name
          group: 'mlp.{i}'
      frozen: ['rotary']             # parameters matching these regexes stay as in the anchor
    dtype: auto                      # working dtype: auto (the anchor's) | float32 | bfloat16 | float16
    device: auto                     # auto (cuda when present) | cpu | cuda | cuda:N

Relative paths are relative to the spec file (or to ``base_dir`` for a dict). Names are the live model's
parameter names (``model.named_parameters()``); ``safesearch groups SPEC`` prints them with their groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safesearch.errors import UserError
from safesearch.textfiles import read_yaml

if TYPE_CHECKING:
    import torch

# Names only: torch loads where a merge runs, not where a spec is read (the CLI starts without it).
DTYPES = ("float32", "bfloat16", "float16")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_DIFF = re.compile(r"^\s*(\S+)\s+-\s+(\S+)\s*$")


@dataclass(frozen=True)
class CheckpointSpec:
    """A named checkpoint directory; ``prefix_map`` renames its model names into the anchor's."""

    name: str
    path: Path
    prefix_map: tuple[tuple[str, str], ...] = ()

    def map_name(self, name: str) -> str:
        """``name`` with its longest matching prefix replaced (unchanged when none matches)."""
        for old, new in self.prefix_map:  # sorted longest first by the loader
            if name.startswith(old):
                return new + name[len(old) :]
        return name


@dataclass(frozen=True)
class DareSpec:
    rate: float
    seed: int = 0


@dataclass(frozen=True)
class VectorSpec:
    """``tau = plus - minus``, then optional Gram-Schmidt, TIES-style trimming and DARE, in that order."""

    name: str
    plus: str
    minus: str
    orthogonalize: str | None = None
    trim: float | None = None
    dare: DareSpec | None = None


@dataclass(frozen=True)
class GroupRule:
    pattern: str
    group: str


@dataclass(frozen=True)
class GroupSpec:
    """How parameters map to groups: user rules first, then the preset; ``frozen`` patterns are left out."""

    preset: str | None = "layer"
    rules: tuple[GroupRule, ...] = ()
    frozen: tuple[str, ...] = ()
    where: str = field(default="groups", compare=False)  # how errors name the section: "FILE: groups"


@dataclass(frozen=True)
class GraftSpec:
    anchor: str
    checkpoints: dict[str, CheckpointSpec]
    vectors: dict[str, VectorSpec]
    groups: GroupSpec = field(default_factory=GroupSpec)
    dtype: str = "auto"
    device: str = "auto"
    source: Path | None = None

    @property
    def anchor_checkpoint(self) -> CheckpointSpec:
        return self.checkpoints[self.anchor]

    def torch_dtype(self, anchor_dtype: torch.dtype) -> torch.dtype:
        """The working dtype: the spec's, or for ``auto`` the anchor's floating dtype."""
        import torch

        return anchor_dtype if self.dtype == "auto" else getattr(torch, self.dtype)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (absolute paths), for provenance files; loads back with :func:`spec_from_dict`."""
        return {
            "anchor": self.anchor,
            "checkpoints": {
                c.name: {"path": str(c.path), "prefix_map": dict(c.prefix_map)} for c in self.checkpoints.values()
            },
            "vectors": {
                v.name: {
                    "diff": f"{v.plus} - {v.minus}",
                    **({"orthogonalize": v.orthogonalize} if v.orthogonalize else {}),
                    **({"trim": v.trim} if v.trim is not None else {}),
                    **({"dare": {"rate": v.dare.rate, "seed": v.dare.seed}} if v.dare else {}),
                }
                for v in self.vectors.values()
            },
            "groups": {
                "preset": self.groups.preset,
                "rules": [{"pattern": r.pattern, "group": r.group} for r in self.groups.rules],
                "frozen": list(self.groups.frozen),
            },
            "dtype": self.dtype,
            "device": self.device,
        }


def load_spec(path: str | Path) -> GraftSpec:
    """Read and validate a graft spec file; every error names the file and the field."""
    path = Path(path)
    data = read_yaml(path, "graft spec")
    return spec_from_dict(data, base_dir=path.parent, where=str(path), source=path)


def graft_field(raw: Any, base: Path, where: str) -> GraftSpec:
    """A study spec's ``graft:`` field: a graft spec file (relative to ``base``), or the graft spec inline."""
    if isinstance(raw, str):
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else (base / path).resolve()
        try:
            return load_spec(path)
        except UserError as e:
            raise UserError(f"{where}: {e.message}") from None
    return spec_from_dict(raw, base_dir=base, where=where)


def load_graft(path: str | Path) -> GraftSpec:
    """The graft of a graft spec file, or of a study spec file (its ``graft:`` field, a file or inline), so
    that ``safesearch groups`` reads either. Only the graft is validated."""
    path = Path(path)
    data = read_yaml(path, "graft or study spec")
    if isinstance(data, dict) and "graft" in data and "anchor" not in data:
        raw = data["graft"]
        if not isinstance(raw, (str, dict)):
            raise UserError(f"{path}: graft: expected a graft spec file or the graft spec inline, got {raw!r}")
        return graft_field(raw, path.parent, f"{path}: graft")
    return spec_from_dict(data, base_dir=path.parent, where=str(path), source=path)


def spec_from_dict(
    data: Any, base_dir: str | Path | None = None, where: str = "graft spec", source: Path | None = None
) -> GraftSpec:
    """Validate a spec given as plain data; ``where`` prefixes error messages (a file name or a field path)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    d = _mapping(data, where)
    _known(d, where, {"anchor", "checkpoints", "vectors", "groups", "dtype", "device"})

    ckpts_raw = _mapping(_required(d, "checkpoints", where), f"{where}: checkpoints")
    if not ckpts_raw:
        raise UserError(f"{where}: checkpoints: is empty")
    checkpoints = {name: _checkpoint(name, raw, base, f"{where}: checkpoints.{name}") for name, raw in ckpts_raw.items()}

    anchor = _required(d, "anchor", where)
    if not isinstance(anchor, str) or anchor not in checkpoints:
        raise UserError(f"{where}: anchor: {anchor!r} is not one of the checkpoints ({', '.join(checkpoints)})")
    if checkpoints[anchor].prefix_map:
        raise UserError(f"{where}: checkpoints.{anchor}: the anchor's names are the reference; it takes no prefix_map")

    vec_raw = _mapping(_required(d, "vectors", where), f"{where}: vectors")
    if not vec_raw:
        raise UserError(f"{where}: vectors: is empty")
    vectors = {name: _vector(name, raw, checkpoints, f"{where}: vectors.{name}") for name, raw in vec_raw.items()}
    for v in vectors.values():
        if v.orthogonalize is not None and v.orthogonalize not in vectors:
            raise UserError(
                f"{where}: vectors.{v.name}.orthogonalize: {v.orthogonalize!r} is not one of the vectors ({', '.join(vectors)})"
            )
    _check_acyclic(vectors, where)

    groups = _groups(d.get("groups", {}), f"{where}: groups")
    dtype = d.get("dtype", "auto")
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in DTYPES):
        raise UserError(f"{where}: dtype: {dtype!r} is not auto, {', '.join(DTYPES)}")
    device = d.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UserError(f"{where}: device: {device!r} is not auto, cpu, cuda or cuda:N")
    return GraftSpec(anchor, checkpoints, vectors, groups, dtype, device, source)


# -- fields --------------------------------------------------------------------------------------------


def _checkpoint(name: Any, raw: Any, base: Path, where: str) -> CheckpointSpec:
    _check_name(name, where)
    if isinstance(raw, str):
        raw = {"path": raw}
    d = _mapping(raw, where)
    _known(d, where, {"path", "prefix_map"})
    path = _required(d, "path", where)
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}.path: expected a directory path, got {path!r}")
    p = Path(path).expanduser()
    pm = _mapping(d.get("prefix_map", {}), f"{where}.prefix_map")
    for old, new in pm.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise UserError(f"{where}.prefix_map: {old!r}: {new!r} must map a string prefix to a string prefix")
    ordered = tuple(sorted(pm.items(), key=lambda kv: -len(kv[0])))
    return CheckpointSpec(name, p if p.is_absolute() else (base / p).resolve(), ordered)


def _vector(name: Any, raw: Any, checkpoints: Mapping[str, CheckpointSpec], where: str) -> VectorSpec:
    _check_name(name, where)
    d = _mapping(raw, where)
    _known(d, where, {"diff", "orthogonalize", "trim", "dare"})
    diff = _required(d, "diff", where)
    m = _DIFF.match(diff) if isinstance(diff, str) else None
    if not m:
        raise UserError(f"{where}.diff: expected 'A - B' naming two checkpoints, got {diff!r}")
    plus, minus = m.groups()
    for c in (plus, minus):
        if c not in checkpoints:
            raise UserError(f"{where}.diff: {c!r} is not one of the checkpoints ({', '.join(checkpoints)})")
    if plus == minus:
        raise UserError(f"{where}.diff: {diff!r} is zero")
    ortho = d.get("orthogonalize")
    if ortho is not None and not isinstance(ortho, str):
        raise UserError(f"{where}.orthogonalize: expected a vector name, got {ortho!r}")
    if ortho == name:
        raise UserError(f"{where}.orthogonalize: a vector cannot be orthogonalized against itself")
    trim = d.get("trim")
    if trim is not None:
        trim = _number(trim, f"{where}.trim")
        if not 0 < trim <= 1:
            raise UserError(f"{where}.trim: the density to keep must be in (0, 1], got {trim}")
    dare = None
    if "dare" in d:
        dd = _mapping(d["dare"], f"{where}.dare")
        _known(dd, f"{where}.dare", {"rate", "seed"})
        rate = _number(_required(dd, "rate", f"{where}.dare"), f"{where}.dare.rate")
        if not 0 <= rate < 1:
            raise UserError(f"{where}.dare.rate: the drop rate must be in [0, 1), got {rate}")
        seed = dd.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise UserError(f"{where}.dare.seed: expected an integer, got {seed!r}")
        dare = DareSpec(rate, seed)
    return VectorSpec(name, plus, minus, ortho, trim, dare)


def _groups(raw: Any, where: str) -> GroupSpec:
    d = _mapping(raw, where)
    _known(d, where, {"preset", "rules", "frozen"})
    rules_raw = d.get("rules", [])
    if not isinstance(rules_raw, list):
        raise UserError(f"{where}.rules: expected a list of {{pattern, group}}, got {type(rules_raw).__name__}")
    rules = []
    for i, r in enumerate(rules_raw):
        rd = _mapping(r, f"{where}.rules[{i}]")
        _known(rd, f"{where}.rules[{i}]", {"pattern", "group"})
        pattern = _regex(_required(rd, "pattern", f"{where}.rules[{i}]"), f"{where}.rules[{i}].pattern")
        group = _required(rd, "group", f"{where}.rules[{i}]")
        if not isinstance(group, str) or not group:
            raise UserError(f"{where}.rules[{i}].group: expected a group name (may use {{capture}}), got {group!r}")
        names = set(re.compile(pattern).groupindex)
        used = set(re.findall(r"{(\w*)}", group))
        if used - names:
            raise UserError(
                f"{where}.rules[{i}].group: {group!r} uses {sorted(used - names)}, not named captures of its pattern"
            )
        rules.append(GroupRule(pattern, group))
    # No preset key: the default preset unless rules are given (then rules alone must place everything).
    preset = d.get("preset", None if rules else "layer")
    if preset is not None:
        from safesearch.grouping import check_preset

        if not isinstance(preset, str):
            raise UserError(f"{where}.preset: expected a preset name, got {preset!r}")
        check_preset(preset, f"{where}.preset")
    frozen_raw = d.get("frozen", [])
    if isinstance(frozen_raw, str):
        frozen_raw = [frozen_raw]
    if not isinstance(frozen_raw, list):
        raise UserError(f"{where}.frozen: expected a list of regexes, got {type(frozen_raw).__name__}")
    frozen = tuple(_regex(p, f"{where}.frozen[{i}]") for i, p in enumerate(frozen_raw))
    return GroupSpec(preset, tuple(rules), frozen, where)


def _check_acyclic(vectors: Mapping[str, VectorSpec], where: str) -> None:
    for start in vectors:
        seen = [start]
        nxt = vectors[start].orthogonalize
        while nxt is not None:
            if nxt in seen:
                raise UserError(f"{where}: vectors: orthogonalize forms a cycle ({' -> '.join([*seen, nxt])})")
            seen.append(nxt)
            nxt = vectors[nxt].orthogonalize


# -- helpers -------------------------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: expected a mapping, got {type(value).__name__} {value!r:.60}")
    return dict(value)


def _known(d: Mapping, where: str, allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")


def _required(d: Mapping, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise UserError(f"{where}: missing field {key!r}")
    return d[key]


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{where}: {name!r} is not a valid name (letters, digits, _ . -, not starting with a digit)")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _regex(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: expected a regular expression, got {value!r}")
    try:
        re.compile(value)
    except re.error as e:
        raise UserError(f"{where}: {value!r} is not a valid regular expression ({e})") from None
    return value
