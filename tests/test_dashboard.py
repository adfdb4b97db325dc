"""``safesearch dashboard`` on a real study (made by `safesearch run` and `validate`), read over HTTP through
optuna-dashboard's own JSON API: objective names, the feasible front as best trials, every trial's
constraint values, notes and previewable responses. (tests/test_dashboard_browser.py renders the pages.)"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from cli_run import run_cli
from dashboard_study import make_dashboard_study, served_dashboard
from optuna_dashboard._pareto_front import get_pareto_front_trials

from safesearch.cli import main
from safesearch.storage import open_storage


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read()


@pytest.fixture(scope="module")
def served(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real study (`safesearch run` and `validate`), served by `safesearch dashboard` in a subprocess."""
    made = make_dashboard_study(tmp_path_factory.mktemp("dash"), toyworld_small)
    with served_dashboard(made) as (base, study_id):
        detail = json.loads(_get(f"{base}/api/studies/{study_id}"))
        yield {**made, "base": base, "id": study_id, "detail": detail}


def _pareto(served: dict[str, Any], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "pareto", served["name"], "--storage", served["url"], "--json")
    assert code == 0, err
    return json.loads(out)


def test_axes_and_columns_read_the_objective_names(served: dict[str, Any]) -> None:
    assert served["detail"]["objective_names"] == ["safety", "medical"]
    assert served["detail"]["directions"] == ["maximize", "maximize"]


def test_best_trials_are_the_feasible_front_of_safesearch_pareto(served: dict[str, Any], capsys) -> None:
    detail = served["detail"]
    report = _pareto(served, capsys)
    front = sorted(t["trial"] for t in report["front"])
    assert sorted(t["number"] for t in detail["best_trials"]) == front
    # The study is one where it matters: ignoring constraints (what optuna-dashboard 0.21 does on its own)
    # gives another front, made of infeasible trials.
    study = optuna.load_study(study_name=served["name"], storage=served["url"])
    unconstrained = sorted(t.number for t in get_pareto_front_trials(study.trials, study.directions))
    assert unconstrained != front
    # Every trial's constraint values, where the dashboard reads them: the list, one value per constraint.
    by_number = {t["number"]: t for t in detail["trials"]}
    for t in study.trials:
        violation = t.user_attrs["constraint_scores"]["over_refusal"] - 0.0  # max: 0.0
        assert by_number[t.number]["constraints"] == [pytest.approx(violation)]
    assert all(c <= 0 for b in detail["best_trials"] for c in b["constraints"])


def test_every_trial_tells_its_story_in_its_note(served: dict[str, Any]) -> None:
    trials = {t["number"]: t for t in served["detail"]["trials"]}
    study = optuna.load_study(study_name=served["name"], storage=served["url"])
    for t in study.trials:
        note = trials[t.number]["note"]["body"]
        heading = f"## Trial {t.number}" + (f": baseline `{t.user_attrs['baseline']}`" if "baseline" in t.user_attrs
                                            else "")
        assert note.startswith(heading + "\n"), note[:80]
        assert "### Search split" in note and "### Coefficients" in note and "### Sample exchanges" in note
        for key in t.user_attrs["suites"]:
            assert f"| {key} |" in note
        for group in t.user_attrs["coefficients"]["safety"]:
            assert f"| {group} |" in note
    # Validated trials (the front and the baselines) also show their holdout scores.
    validated = [t.number for t in study.trials if f"holdout.trial.{t.number}" in study.user_attrs]
    assert validated and all("### Holdout split" in trials[n]["note"]["body"] for n in validated)
    assert all("### Holdout split" not in trials[t.number]["note"]["body"] for t in study.trials
               if t.number not in validated)
    # The study's note: validate's table, one row per validated trial and checkpoint.
    study_note = served["detail"]["note"]["body"]
    assert study_note.startswith("## Holdout split (safesearch validate)")
    assert all(f"\n| {n} |" in study_note for n in validated) and "| [aligned] |" in study_note


def test_responses_preview_as_jsonl_with_the_prompt_beside_the_response(served: dict[str, Any]) -> None:
    trial = served["detail"]["trials"][0]
    (meta,) = trial["artifacts"]
    assert meta["filename"] == f"responses-{trial['number']}.jsonl"  # the dashboard previews .csv and .jsonl
    body = _get(f"{served['base']}/artifacts/{served['id']}/{trial['trial_id']}/{meta['artifact_id']}")
    rows = [json.loads(line) for line in body.decode().splitlines()]
    harmful = [r for r in rows if r["suite"].startswith("toy-harmful-general@search")]
    assert len(harmful) == 10 and all(r["prompt"] and "response" in r and r["verdict"] for r in harmful)
    mcq = [r for r in rows if r["suite"].startswith("toy-mcq-medical@search")]
    assert all(r["chosen"].startswith("The answer is") and isinstance(r["correct"], bool) for r in mcq)
    # The page itself (the browser's entry point) is served too.
    assert b"<html" in _get(f"{served['base']}/dashboard").lower()


def test_dashboard_refuses_missing_sqlite_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "--storage", f"sqlite:///{missing}", "--port", "0"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: storage sqlite:///") and "does not exist" in err and "\n" not in err
    assert not missing.exists()  # no empty database left behind


def test_dashboard_refuses_taken_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    open_storage(url, heartbeat_interval=None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["dashboard", "--storage", url, "--port", str(port), "--artifacts", str(tmp_path / "a")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err == f"error: --port {port}: already in use on 127.0.0.1 (choose another port)"
