"""Baselines a user controls: a global lambda for any vector or a joint grid, own coefficient sets
(``baselines.enqueue``), their labels, their ranges, the spec's round trip; then a real study that runs
them first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_run import run_cli
from study_world import spec_dict, write_spec

from safesearch.errors import UserError
from safesearch.search import build_space
from safesearch.studyspec import study_spec_from_dict

GROUPS = {"safety": ["embed", "layer.0", "layer.1", "head"], "medical": ["embed", "layer.0", "layer.1", "head"]}


def _params(tmp_path: Path, baselines: dict[str, Any], **search: Any) -> dict[str, dict[str, float]]:
    d = spec_dict(tmp_path, tmp_path, baselines=baselines)
    d["search"].update(search)
    spec = study_spec_from_dict(d)
    again = study_spec_from_dict({**spec.to_dict(), "name": spec.name})
    assert again.baselines == spec.baselines  # what the study stores parses back to the same baselines
    return dict(build_space(spec, GROUPS, GROUPS).baseline_params(spec))


def test_a_lambda_per_vector_and_a_joint_grid(tmp_path: Path) -> None:
    ps = _params(tmp_path, {"zero": False, "global_lambda": [
        {"vector": "safety", "values": [0.5]}, {"vector": "medical", "values": [-0.25, 0.25]}]})
    assert list(ps) == ["lambda safety=0.5", "lambda medical=-0.25", "lambda medical=0.25"]
    assert set(ps["lambda medical=-0.25"].values()) == {-0.25, 0.0}
    assert ps["lambda medical=-0.25"]["safety.head"] == 0.0 and ps["lambda medical=-0.25"]["medical.head"] == -0.25
    ps = _params(tmp_path, {"zero": True, "global_lambda": {"grid": {"safety": [0.5, 1.0], "medical": [-0.3, 0.0]}}})
    assert list(ps) == ["zero", "lambda safety=0.5 medical=-0.3", "lambda safety=0.5 medical=0",
                        "lambda safety=1 medical=-0.3", "lambda safety=1 medical=0"]
    p = ps["lambda safety=1 medical=-0.3"]
    assert p["safety.layer.0"] == 1.0 and p["medical.layer.1"] == -0.3
    # The one-vector form keeps its labels.
    assert list(_params(tmp_path, {"global_lambda": {"vector": "safety", "values": [0.5]}})) == ["zero", "lambda=0.5"]


def test_own_points_uniform_and_per_group(tmp_path: Path) -> None:
    ps = _params(tmp_path, {"zero": False, "enqueue": [
        {"label": "aligned", "coefficients": {"medical": -0.3}},
        {"coefficients": {"safety": {"^layer": 0.75, ".": 0.25}, "medical": {"head": 0.1}}},
    ]})
    assert list(ps) == ["aligned", "enqueue[1]"]
    assert ps["aligned"] == {f"{v}.{g}": (-0.3 if v == "medical" else 0.0) for v in GROUPS for g in GROUPS[v]}
    own = ps["enqueue[1]"]
    assert own["safety.layer.0"] == 0.75 and own["safety.layer.1"] == 0.75  # the first matching pattern wins
    assert own["safety.embed"] == 0.25 and own["safety.head"] == 0.25
    assert own["medical.head"] == 0.1 and own["medical.embed"] == 0.0  # a group no pattern matches is 0


def test_a_scaled_vector_takes_one_value_as_its_scale(tmp_path: Path) -> None:
    ps = _params(tmp_path, {"zero": False, "enqueue": [{"label": "s", "coefficients": {"safety": 0.4}}]},
                 safety={"scale": [0.0, 1.0], "factor": [0.5, 1.5]})
    assert ps["s"]["safety.scale"] == 0.4 and ps["s"]["safety.factor.head"] == 1.0


@pytest.mark.parametrize(("baselines", "search", "message"), [
    ({"enqueue": [{"coefficients": {"nope": 0.5}}]}, {}, r"baselines.enqueue\[0\].coefficients.nope: 'nope' is not a vector"),
    ({"enqueue": [{"coefficients": {"safety": 2.0}}]}, {}, r"enqueue\[0\].coefficients.safety: 2.0 is outside search.safety.range"),
    ({"enqueue": [{"coefficients": {}}]}, {}, r"enqueue\[0\].coefficients: names no vector"),
    ({"enqueue": [{"label": "zero", "coefficients": {"safety": 0.5}}]}, {}, r"two baselines are labelled 'zero'"),
    ({"enqueue": [{"coefficients": {"safety": {"(": 0.5}}}]}, {}, r"coefficients.safety.\(: not a regular expression"),
    ({"enqueue": [{"coefficients": {"safety": {"head": 0.5}}}]}, {"safety": {"scale": [0.0, 1.0], "factor": [0.5, 1.5]}},
     r"per-group values need search.safety without scale"),
    ({"enqueue": [{"coefficients": {"safety": 0.5}, "extra": 1}]}, {}, r"enqueue\[0\].extra: unknown field"),
    ({"global_lambda": {"grid": {"safety": []}}}, {}, r"global_lambda.grid.safety: expected a list of numbers"),
    ({"global_lambda": {"grid": {"medical": [1.0]}}}, {}, r"grid.medical: 1.0 is outside search.medical.range"),
    ({"global_lambda": []}, {}, r"global_lambda: needs at least one"),
    ({"global_lambda": [{"vector": "safety", "values": [0.5], "x": 1}]}, {}, r"global_lambda\[0\].x: unknown field"),
])
def test_bad_baselines_are_refused_in_one_line(tmp_path: Path, baselines: dict[str, Any], search: dict[str, Any],
                                                message: str) -> None:
    d = spec_dict(tmp_path, tmp_path, baselines=baselines)
    d["search"].update(search)
    with pytest.raises(UserError, match=message) as e:
        study_spec_from_dict(d, where="s.yaml")
    assert str(e.value).startswith("s.yaml: ") and "\n" not in str(e.value)


def test_a_point_outside_a_group_range_is_refused_with_its_label(tmp_path: Path) -> None:
    d = spec_dict(tmp_path, tmp_path, baselines={"zero": False, "enqueue": [
        {"label": "mine", "coefficients": {"safety": {"head": 0.1}}}]})
    d["search"]["safety"]["groups"] = {"head": [0.25, 1.0]}
    spec = study_spec_from_dict(d)
    with pytest.raises(UserError, match=r"baselines 'mine': parameter safety.head would be 0.1, outside its range"):
        build_space(spec, GROUPS, GROUPS).baseline_params(spec)
    d["search"]["safety"]["groups"] = {"head": [0.5, 0.5]}  # fixed
    spec = study_spec_from_dict(d)
    with pytest.raises(UserError, match=r"baselines 'mine': group head of safety is fixed at 0.5"):
        build_space(spec, GROUPS, GROUPS).baseline_params(spec)
    # One value for the whole vector sets its searched groups and leaves a fixed one as the search fixed
    # it, whichever form the global lambda takes.
    for lam in ({"vector": "safety", "values": [0.75]}, {"grid": {"safety": [0.75]}}):
        d["baselines"] = {"zero": False, "global_lambda": lam}
        spec = study_spec_from_dict(d)
        space = build_space(spec, GROUPS, GROUPS)
        ((_, params),) = space.baseline_params(spec)
        assert "safety.head" not in params and params["safety.layer.0"] == 0.75
        assert space.coefficients(params)["safety"]["head"] == 0.5


def test_a_study_runs_its_own_points_first(toyworld_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The aligned model, as the medical model less its medical vector (here the nearest point the range
    allows), and a joint grid: enqueued when the study is created, run first, labelled in `pareto`."""
    d = spec_dict(tmp_path, toyworld_small, subset=8, n_trials=4, constraints=[], baselines={
        "zero": False,
        "global_lambda": {"grid": {"safety": [0.5], "medical": [-0.3, 0.3]}},
        "enqueue": [{"label": "toward aligned", "coefficients": {"medical": -0.3}}],
    })
    url = f"sqlite:///{tmp_path / 's.db'}"
    code, _, err = run_cli(capsys, "run", write_spec(tmp_path / "s.yaml", d), "--storage", url)
    assert code == 0, err
    assert "3 baselines enqueued" in err
    code, out, _ = run_cli(capsys, "pareto", "t", "--storage", url, "--json")
    report = json.loads(out)
    labels = {b["trial"]: b["baseline"] for b in report["baselines"]}
    assert labels == {0: "lambda safety=0.5 medical=-0.3", 1: "lambda safety=0.5 medical=0.3", 2: "toward aligned"}
    aligned = next(b for b in report["baselines"] if b["baseline"] == "toward aligned")
    assert set(aligned["coefficients"]["medical"].values()) == {-0.3}
    assert set(aligned["coefficients"]["safety"].values()) == {0.0}
