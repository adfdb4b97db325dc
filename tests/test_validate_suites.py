"""`validate --suite NAME`: the front and the baselines re-scored on suites the study did not search, merged
in place (no export), stored in the study; a split that shares items with the search is refused, and
so is any bad --suite input, before anything is scored."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from cli_run import run_cli
from study_world import spec_dict, write_spec


@pytest.fixture(scope="module")
def study(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A study without the benign suite: its over-refusal is what a user would score afterwards."""
    tmp = tmp_path_factory.mktemp("vs")
    d = spec_dict(tmp, toyworld_small, subset=8, n_trials=3, constraints=[])
    url = f"sqlite:///{tmp / 's.db'}"
    from safesearch.cli import main

    main(["run", str(write_spec(tmp / "s.yaml", d)), "--storage", url])
    return url


def test_extra_suites_are_scored_and_stored(study: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "validate", "t", "--storage", study, "--no-references",
                             "--suite", "toy-benign", "--suite", "toy-harmful-general")
    assert code == 0, err
    assert "extra suites" in out and "toy-benign" in out and "over_refusal" in out, out
    s = optuna.load_study(study_name="t", storage=study)
    stored = {k: v for k, v in s.user_attrs.items() if k.startswith("extra.")}
    trials = {t.number for t in s.get_trials() if t.user_attrs.get("baseline")}
    assert {f"extra.toy-benign@holdout.trial.{n}" for n in trials} <= set(stored)
    assert {f"extra.toy-harmful-general@holdout.trial.{n}" for n in trials} <= set(stored)
    benign = stored[f"extra.toy-benign@holdout.trial.{min(trials)}"]
    assert benign["n"] > 0 and 0.0 <= benign["over_refusal"] <= 1.0
    # The harmful suite was searched: its holdout split was proved disjoint from what the search scored.
    assert "suite toy-harmful-general: search 8 items" in err and "none shared" in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["--suite", "toy-harmful-general", "--split", "search"], "shares"),
    (["--suite", "no-such-suite"], "no-such-suite"),
    (["--suite", "toy-benign", "--split", "nosplit"], "data/nosplit/benign.jsonl"),  # a file per split
    (["--suite", "toy-benign", "--suites-dir", "/nonexistent"], "--suites-dir /nonexistent: does not exist"),
])
def test_bad_suite_inputs_stop_before_scoring(study: str, capsys: pytest.CaptureFixture, args: list[str],
                                              message: str) -> None:
    before = dict(optuna.load_study(study_name="t", storage=study).user_attrs)
    code, _, err = run_cli(capsys, "validate", "t", "--storage", study, "--no-references", "--force", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert dict(optuna.load_study(study_name="t", storage=study).user_attrs) == before
