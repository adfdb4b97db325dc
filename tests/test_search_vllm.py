"""A study on the small toy world, end to end with the vLLM backend (``safesearch run``, SQLite storage):
every trial completes, and the anchor's baseline scores what the transformers backend scores."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
from study_world import spec_dict, write_spec

from safesearch.backends.transformers import TransformersBackend
from safesearch.cli import main
from safesearch.search import BASELINE_ATTR, prepare_tasks, run_tasks, search_refs
from safesearch.studyspec import load_study_spec

pytestmark = pytest.mark.vllm


def _spec_file(tmp_path: Path, world: Path, backend: str, options: dict) -> Path:
    """The tests' small study over the toy world (2 baselines, then the sampler's), on ``backend``."""
    data = spec_dict(tmp_path, world, subset=12, n_trials=4, name="toy-vllm", backend=backend,
                     backend_options=options)
    return write_spec(tmp_path / f"toy-{backend}.yaml", data)


def _main(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_a_study_runs_end_to_end_with_vllm(vllm_available, toyworld_small: Path, tmp_path: Path, capsys) -> None:
    spec_path = _spec_file(tmp_path, toyworld_small, "vllm", {"kv_cache_memory_bytes": 64 << 20})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code = _main(["run", str(spec_path), "--storage", url, "--artifacts", str(tmp_path / "artifacts")])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="toy-vllm", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4 and all(len(t.values) == 2 for t in trials)
    # The anchor as is (the zero baseline) scores on vLLM what the transformers backend scores.
    zero = next(t for t in trials if t.user_attrs.get(BASELINE_ATTR) == "zero")
    spec = load_study_spec(spec_path)
    tasks = prepare_tasks(search_refs(spec), spec.data_root)
    expected = run_tasks(TransformersBackend.from_pretrained(toyworld_small / "medical"), tasks)
    assert zero.user_attrs["suites"] == {k: dict(r.metrics) for k, r in expected.items()}
    assert len({tuple(t.values) for t in trials}) > 1  # the coefficients move the scores


def test_backend_flag_selects_vllm(toyworld_small: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """``--backend vllm`` on a transformers spec: the worker asks for vLLM (missing here on purpose)."""
    spec_path = _spec_file(tmp_path, toyworld_small, "transformers", {"batch_size": 8})
    monkeypatch.setitem(sys.modules, "vllm", None)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code = _main(["worker", str(spec_path), "--storage", url, "--backend", "vllm", "--n-trials", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "pip install -e '.[vllm]'" in err and "Traceback" not in err
