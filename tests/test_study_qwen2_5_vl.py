"""A study on the paper's model family, as a user runs it: tiny random Qwen2.5-VL checkpoints laid out
as releases (aligned / unaligned / medical), a FigStep safety objective, an image MCQ objective and an
over-refusal constraint; `run`, `pareto`, `validate` and `export` through the CLI, from a working
directory that is not the data root (FigStep images are cached under the data root, nowhere else)."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from cli_run import run_cli
from optuna.trial import TrialState
from tiny_models import build_tiny_qwen2_5_vl, finetuned_copy
from vlm_world import corpus, study_spec, write_data, write_spec, write_suites

from safesearch.backends.transformers import TransformersBackend


@pytest.fixture(scope="module")
def vlm_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("qwen2_5_vl-study")
    models, data = tmp / "models", tmp / "data-root"
    unaligned = build_tiny_qwen2_5_vl(models / "unaligned", seed=21, vocab_size=None, corpus=corpus())
    aligned = finetuned_copy(unaligned, models / "aligned", seed=22, scale=0.02)
    medical = finetuned_copy(aligned, models / "medical", seed=23, scale=0.02)
    write_data(data)
    family = {"unaligned": unaligned, "aligned": aligned, "medical": medical}
    spec_path = write_spec(tmp / "studies" / "vlm.yaml", study_spec("vlm", family, data, write_suites(tmp)))
    url = f"sqlite:///{tmp / 'store' / 'vlm.db'}"
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return {"tmp": tmp, "spec": spec_path, "url": url, "data": data, "cwd": elsewhere, "medical": medical}


def test_a_figstep_and_image_mcq_study_runs_validates_and_exports(
    vlm_study: dict[str, Any], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(vlm_study["cwd"])
    url = vlm_study["url"]
    code, _, err = run_cli(capsys, "run", str(vlm_study["spec"]), "--storage", url)
    assert code == 0, err
    assert "Traceback" not in err
    study = optuna.load_study(study_name="vlm", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    for t in study.trials:
        assert len(t.values) == 2 and all(0.0 <= v <= 1.0 for v in t.values)
        suites = t.user_attrs["suites"]
        assert {k: v["n"] for k, v in suites.items()} == {
            "figstep-harmful@search": 4, "direct-harmful@search": 4, "image-mcq@search": 3, "benign@search": 3}
    # The searched groups: the projector and the LLM blocks; the vision tower frozen.
    params = set(study.trials[-1].params)
    assert {"safety.projector", "medical.projector", "safety.block.0-1"} <= params
    assert not any("vision" in p for p in params)
    # FigStep images rendered once, under the data root; nothing written where the command ran.
    cached = list((vlm_study["data"] / "storage" / "cache" / "attack-images").glob("*.png"))
    assert len(cached) == 4  # the search split's 4 harmful requests
    assert list(vlm_study["cwd"].iterdir()) == []

    code, out, err = run_cli(capsys, "pareto", "vlm", "--storage", url, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_complete"] == 6 and report["front"]

    code, _, err = run_cli(capsys, "validate", "vlm", "--storage", url, "--no-references")
    assert code == 0, err
    cached = list((vlm_study["data"] / "storage" / "cache" / "attack-images").glob("*.png"))
    assert len(cached) == 8  # and the holdout split's 4
    assert list(vlm_study["cwd"].iterdir()) == []

    out_dir = vlm_study["tmp"] / "exports" / "knee"
    code, _, err = run_cli(capsys, "export", "vlm", "--pick", "knee", "--out", str(out_dir), "--storage", url)
    assert code == 0, err
    # The export is a Qwen2.5-VL release again: it loads with its processor and takes images.
    exported = TransformersBackend.from_pretrained(out_dir)
    assert type(exported.model).__name__ == "Qwen2_5_VLForConditionalGeneration" and exported.accepts_images
    assert (out_dir / "preprocessor_config.json").is_file() and (out_dir / "chat_template.json").is_file()
