"""Study specs for tests: the small toy world laid out as a data root, and a small fast spec over it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

GRAFT: dict[str, Any] = {
    "anchor": "medical",
    "checkpoints": {"aligned": "", "unaligned": "", "medical": ""},
    "vectors": {
        "safety": {"diff": "aligned - unaligned", "orthogonalize": "medical"},
        "medical": {"diff": "medical - aligned"},
    },
    "groups": {"preset": "layer"},
}


def data_root(tmp_path: Path, world: Path) -> Path:
    """The data root of the toy suites (their paths are data/{split}/... inside a toy world): the world."""
    return world.resolve()


def spec_dict(tmp_path: Path, world: Path, *, subset: int = 12, n_trials: int = 4, **overrides: Any) -> dict[str, Any]:
    """A small study on ``world``: 2 baselines (zero, lambda=0.5), subsets of ``subset`` items."""
    graft = copy.deepcopy(GRAFT)
    graft["checkpoints"] = {name: str(world / name) for name in graft["checkpoints"]}
    spec: dict[str, Any] = {
        "name": "t",
        "graft": graft,
        "data_root": str(data_root(tmp_path, world)),
        "search": {"safety": {"range": [0.0, 1.0]}, "medical": {"range": [-0.3, 0.3]}},
        "objectives": [
            {"name": "safety", "suites": ["toy-harmful-general", "toy-harmful-medical"], "subset": subset,
             "holdout_subset": subset},
            {"name": "medical", "suite": "toy-mcq-medical", "subset": subset, "holdout_subset": subset},
        ],
        "constraints": [
            {"name": "over_refusal", "suite": "toy-benign", "subset": subset, "holdout_subset": subset, "max": 0.1}
        ],
        "baselines": {"zero": True, "global_lambda": {"vector": "safety", "values": [0.5]}},
        "sampler": "tpe",
        "seed": 0,
        "n_trials": n_trials,
    }
    spec.update(overrides)
    return spec


def write_spec(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
