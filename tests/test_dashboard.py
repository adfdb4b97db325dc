"""``safesearch dashboard``: the real command serves optuna-dashboard on loopback, read over HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import optuna
import pytest

from safesearch.cli import main
from safesearch.storage import artifact_store_for, open_storage, open_study

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))


def _study_with_artifact(url: str, artifacts: Path) -> tuple[optuna.Study, str, bytes]:
    study = open_study(open_storage(url, heartbeat_interval=None), "dash-study", ["maximize", "maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["safety", "medical"])
    trial = study.ask()
    trial.suggest_float("c.safety.attn", 0.0, 2.0)
    responses = artifacts.parent / "responses.jsonl"
    body = b'{"id": "h1", "response": "I cannot help with that."}\n'
    responses.write_bytes(body)
    artifact_id = optuna.artifacts.upload_artifact(
        artifact_store=artifact_store_for(url, artifacts), file_path=str(responses), study_or_trial=trial,
        mimetype="application/jsonl",
    )
    study.tell(trial, [0.9, 0.4])
    return study, artifact_id, body


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read()


def test_dashboard_serves_study_objectives_and_artifact(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    artifacts = tmp_path / "artifacts"
    study, artifact_id, body = _study_with_artifact(url, artifacts)

    proc = subprocess.Popen(
        [SAFESEARCH, "dashboard", "--storage", url, "--port", "0", "--artifacts", str(artifacts)],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, "SAFESEARCH_STORAGE": ""},
    )
    try:
        line = proc.stderr.readline()  # the command announces its address once it listens
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"no address announced: {line!r}{proc.stderr.read() if proc.poll() is not None else ''}"
        base = f"http://127.0.0.1:{m.group(1)}"

        studies = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "dash-study"]
        detail = json.loads(_get(f"{base}/api/studies/{summary['study_id']}"))
        assert detail["name"] == "dash-study"
        assert detail["directions"] == ["maximize", "maximize"]
        assert detail["objective_names"] == ["safety", "medical"]
        (trial,) = detail["trials"]
        assert trial["values"] == [0.9, 0.4]
        assert [b["number"] for b in detail["best_trials"]] == [0]
        (meta,) = trial["artifacts"]
        assert meta["artifact_id"] == artifact_id and meta["filename"] == "responses.jsonl"

        got = _get(f"{base}/artifacts/{summary['study_id']}/{trial['trial_id']}/{artifact_id}")
        assert got == body
        # The dashboard page itself is served too (the browser's entry point).
        assert b"<html" in _get(f"{base}/dashboard").lower()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
