"""The search commands end to end on the small toy world: run, pareto, validate, export (reloaded with
plain transformers and re-scored to the stored values), worker, and their one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from cli_run import run_cli
from optuna.trial import TrialState
from study_world import spec_dict, write_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from safesearch.backends.transformers import TransformersBackend
from safesearch.cli import main
from safesearch.search import (
    HOLDOUT_CHECKPOINT,
    HOLDOUT_TRIAL,
    holdout_refs,
    prepare_tasks,
    run_tasks,
    score_all,
    search_refs,
)
from safesearch.studyspec import load_study_spec


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    return run_cli(capsys, *args)


@pytest.fixture(scope="module")
def done(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One study run through the CLI: 2 baselines and 2 searched trials, validated, knee exported."""
    tmp = tmp_path_factory.mktemp("cli")
    spec = write_spec(tmp / "studies" / "t.yaml", spec_dict(tmp, toyworld_small, subset=10, n_trials=4))
    url = f"sqlite:///{tmp / 'st' / 'safesearch.db'}"
    logs = {}
    for name, args in (("run", ["run", str(spec)]), ("validate", ["validate", "t"])):
        with contextlib.redirect_stderr(io.StringIO()) as err:  # a log, not a terminal
            main([*args, "--storage", url])
        logs[name] = err.getvalue()
    out = tmp / "exports" / "knee"
    main(["export", "t", "--pick", "knee", "--out", str(out), "--storage", url])
    return {"tmp": tmp, "spec": spec, "url": url, "out": out, "logs": logs}


def test_run_and_validate_log_a_line_per_trial_off_a_terminal(done: dict[str, Any]) -> None:
    """Where rich draws no live bar (output to a file, a batch job), progress is still told as it goes."""
    run_lines = [line for line in done["logs"]["run"].splitlines() if line.startswith("trial ")]
    assert [line.split(":")[0] for line in run_lines] == ["trial 0 [zero]", "trial 1 [lambda=0.5]", "trial 2",
                                                          "trial 3"]
    assert all("safety=" in line and "study " in line for line in run_lines)
    val_lines = [line for line in done["logs"]["validate"].splitlines() if line.startswith("validate t: ")]
    assert val_lines and all(" on holdout: safety=" in line for line in val_lines)
    assert val_lines[-1].endswith(f"{len(val_lines)}/{len(val_lines)})")


def _study(done: dict[str, Any]) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=done["url"])


def test_run_fills_the_study_and_pareto_reports_it(done: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    study = _study(done)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert [t.user_attrs.get("baseline") for t in study.trials[:2]] == ["zero", "lambda=0.5"]
    code, out, err = run(["pareto", "t", "--storage", done["url"], "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["directions"] == {"safety": "maximize", "medical": "maximize"}
    assert report["n_complete"] == 4
    assert {b["baseline"] for b in report["baselines"]} == {"zero", "lambda=0.5"}
    assert report["front"] and set(report["picks"]) == {"knee", "max-safety", "max-medical"}
    assert report["picks_split"] == "holdout"  # the fixture validated the front before anything picked
    plot = Path(report["plot"])
    assert plot == done["tmp"] / "st" / "plots" / "t-pareto.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(["pareto", "t", "--storage", done["url"]], capsys)
    assert code == 0 and "Pareto front" in out and "lambda=0.5" in out and "picks on holdout" in out and "knee = trial" in out


def test_validate_stores_holdout_scores_for_front_baselines_and_checkpoints(done: dict[str, Any]) -> None:
    study = _study(done)
    attrs = study.user_attrs
    report_front = {r["trial"] for r in json.loads(_pareto_json(done))["front"]}
    for n in report_front | {0, 1}:
        h = attrs[f"{HOLDOUT_TRIAL}{n}"]
        assert set(h["scores"]) == {"safety", "medical"} and "over_refusal" in h["constraint_scores"]
        assert "toy-mcq-medical@holdout[10]" in h["suites"]
    # The checkpoints the vectors add; the anchor (medical) is the zero baseline's weights, scored once.
    assert {k for k in attrs if k.startswith(HOLDOUT_CHECKPOINT)} == {
        f"{HOLDOUT_CHECKPOINT}aligned", f"{HOLDOUT_CHECKPOINT}medical"}
    assert attrs[f"{HOLDOUT_CHECKPOINT}medical"] == attrs[f"{HOLDOUT_TRIAL}0"]
    aligned = attrs[f"{HOLDOUT_CHECKPOINT}aligned"]["suites"]
    assert aligned["toy-harmful-general@holdout[10]"]["n"] == 10


def _pareto_json(done: dict[str, Any]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["pareto", "t", "--storage", done["url"], "--json"])
    return buf.getvalue()


def test_export_reloads_with_plain_transformers_and_rescores_exactly(done: dict[str, Any]) -> None:
    out: Path = done["out"]
    prov = json.loads((out / "safesearch.json").read_text())
    s = prov["study"]
    study = _study(done)
    trial = study.trials[s["trial"]]
    assert s["name"] == "t" and s["pick"] == "knee" and s["pick_split"] == "holdout"
    assert s["search_scores"] == trial.user_attrs["scores"]
    assert s["holdout"]["scores"] == study.user_attrs[f"{HOLDOUT_TRIAL}{s['trial']}"]["scores"]
    assert prov["coefficients"] == trial.user_attrs["coefficients"]

    # Plain transformers: the exported directory loads on its own and scores what the trial scored.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    backend = TransformersBackend(model, tokenizer)
    spec = load_study_spec(done["spec"])
    search = score_all(spec, run_tasks(backend, prepare_tasks(search_refs(spec), spec.data_root)))
    assert search["scores"] == trial.user_attrs["scores"]
    assert search["constraint_scores"] == trial.user_attrs["constraint_scores"]
    holdout = score_all(spec, run_tasks(backend, prepare_tasks(holdout_refs(spec), spec.data_root)), holdout=True)
    assert holdout["scores"] == s["holdout"]["scores"]


def test_export_refuses_missing_and_unfinished_trials(done: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    url, tmp = done["url"], done["tmp"]
    code, _, err = run(["export", "t", "--trial", "99", "--out", str(tmp / "x"), "--storage", url], capsys)
    assert code == 2 and err == "error: --trial 99: study 't' has no such trial (trials 0-3)\n"
    study = _study(done)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    code, _, err = run(["export", "t", "--trial", str(failed.number), "--out", str(tmp / "x"), "--storage", url], capsys)
    assert code == 2
    assert err == f"error: --trial {failed.number}: trial {failed.number} of study 't' is FAIL, not COMPLETE; only completed trials export\n"
    code, _, err = run(["export", "nope", "--pick", "knee", "--out", str(tmp / "x"), "--storage", url], capsys)
    assert code == 2 and err.startswith("error: study 'nope': not found in storage sqlite:///") and err.count("\n") == 1
    code, _, err = run(["export", "t", "--trial", "0", "--out", str(done["out"]), "--storage", url], capsys)
    assert code == 2 and "already exists" in err
    assert not (tmp / "x").exists()


def test_worker_joins_and_study_errors(done: dict[str, Any], toyworld_small: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = write_spec(tmp_path / "w.yaml", spec_dict(tmp_path, toyworld_small, subset=6, n_trials=3,
                                                     baselines={"zero": True}))
    code, _, err = run(["study", "create", str(spec), "--storage", url], capsys)
    assert code == 0 and "created study t" in err and "1 baselines enqueued" in err
    code, _, err = run(["worker", str(spec), "--storage", url, "--n-trials", "1"], capsys)
    assert code == 0 and "worker done: 1 trials here; the study has 1/3 complete" in err
    code, _, err = run(["worker", str(spec), "--storage", url], capsys)
    assert code == 0 and "worker done: 2 trials here; the study has 3/3 complete" in err
    study = optuna.load_study(study_name="t", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.trials[0].user_attrs["baseline"] == "zero"

    # The same name with other directions: one line, nothing changed.
    single = write_spec(tmp_path / "s.yaml", spec_dict(tmp_path, toyworld_small, subset=6, n_trials=3,
                                                       sampler={"name": "cmaes-weighted"}))
    code, _, err = run(["worker", str(single), "--storage", url], capsys)
    assert code == 2
    assert err.startswith("error: study 't' in storage sqlite:///") and "exists with directions [maximize, maximize], not [maximize]" in err
    # A server that cannot be reached: named, password masked.
    code, _, err = run(["study", "create", str(spec), "--storage",
                        "postgresql+psycopg://u:s3cret@127.0.0.1:1/nodb"], capsys)
    assert code == 2 and err.count("\n") == 1 and "s3cret" not in err and "127.0.0.1" in err and "nodb" in err


def test_the_demo_points_the_toy_study_at_its_world(tmp_path: Path) -> None:
    from safesearch.cli.demo import demo_spec

    storage = tmp_path / "elsewhere"
    (storage / "toyworld").mkdir(parents=True)
    spec = demo_spec(storage, 2)
    assert spec.name == "toy-seed2" and spec.seed == 2
    assert spec.graft.checkpoints["aligned"].path == (storage / "toyworld" / "aligned").resolve()
    # The toy suites read data/{split}/... of the data root: the world itself, wherever it was built.
    suite = spec.objectives[0].suites[0].suite
    data = suite.dataset.resolved_path(spec.data_root).parent.parent
    assert data.resolve() == (storage / "toyworld" / "data").resolve()
    assert demo_spec(tmp_path / "storage", 0).data_root == (tmp_path / "storage" / "toyworld").resolve()


def _copy_with_changed_checkpoint(done: dict[str, Any], tmp_path: Path) -> str:
    """A copy of the study whose record of the anchor's config.json no longer matches the file."""
    import sqlite3

    db = tmp_path / "copy.db"
    src, dst = sqlite3.connect(done["url"].removeprefix("sqlite:///")), sqlite3.connect(db)
    src.backup(dst)
    src.close()
    (raw,) = dst.execute("select value_json from study_user_attributes where key = 'checkpoint_files'").fetchone()
    files = json.loads(raw)
    files["medical"]["config.json"] = [0, 0, "0" * 64]
    dst.execute("update study_user_attributes set value_json = ? where key = 'checkpoint_files'", (json.dumps(files),))
    dst.commit()
    dst.close()
    return f"sqlite:///{db}"


def test_export_guards_out_and_warns_of_changed_checkpoints(done: dict[str, Any], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    recorded = _study(done).user_attrs["checkpoint_files"]
    assert set(recorded) == {"medical", "aligned", "unaligned"} and len(recorded["medical"]["config.json"][2]) == 64
    url = _copy_with_changed_checkpoint(done, tmp_path)
    warning = "warning: checkpoint medical: config.json has changed since study 't' was created"
    code, _, err = run(["validate", "t", "--storage", url], capsys)
    assert code == 0 and warning in err
    out = tmp_path / "out"
    code, _, err = run(["export", "t", "--trial", "0", "--out", str(out), "--storage", url], capsys)
    assert code == 0 and warning in err and (out / "safesearch.json").is_file()
    # --overwrite replaces an earlier export, never a folder of the user's own files.
    code, _, err = run(["export", "t", "--trial", "1", "--out", str(out), "--storage", url, "--overwrite"], capsys)
    assert code == 0 and json.loads((out / "safesearch.json").read_text())["study"]["trial"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run(["export", "t", "--trial", "1", "--out", str(mine), "--storage", url, "--overwrite"], capsys)
    assert code == 2 and "--overwrite replaces only an earlier export" in err and (mine / "notes.txt").exists()


def test_the_demo_reads_the_projects_own_study_not_a_stray_one(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from safesearch.cli.demo import TOY_STUDY, demo_spec

    stray = tmp_path / "studies" / "toy.yaml"
    stray.parent.mkdir()
    stray.write_text("name: stray\n")
    (tmp_path / "objectives").mkdir()
    (tmp_path / "objectives" / "toy-benign.yaml").write_text("metric: nonsense\n")
    monkeypatch.chdir(tmp_path)
    spec = demo_spec(tmp_path / "storage", 0)
    assert spec.name == "toy" and TOY_STUDY.parent.parent != tmp_path
    assert all(r.suite.source.parent == TOY_STUDY.parent.parent / "objectives"
               for o in spec.objectives for r in o.suites)


def test_artifacts_map_trials_to_their_responses(done: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """``safesearch artifacts`` on the study ``run`` made: every trial's responses file listed under its
    trial; one trial's responses printed for a person (each item's suite, id, verdict, prompt, response),
    written as stored (``--out``) and printed as stored (``--jsonl``); the store's UUID file is the same."""
    url = done["url"]
    code, out, err = run(["artifacts", "t", "--storage", url], capsys)
    assert code == 0, err
    listed = [row for row in (line.split() for line in out.splitlines()) if len(row) == 4 and row[0].isdigit()]
    # (the study's first 4 trials; other tests of this module may add to it)
    assert [(row[0], row[1], row[2]) for row in listed[:4]] == [
        (str(n), "COMPLETE", f"responses-{n}.jsonl") for n in range(4)]
    artifact_id = listed[2][3]
    stored = (done["tmp"] / "st" / "artifacts" / artifact_id).read_bytes()

    code, out, err = run(["artifacts", "t", "--storage", url, "--trial", "2"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in stored.decode().splitlines()]
    assert out.splitlines()[0] == f"trial 2 (COMPLETE): {len(rows)} responses (responses-2.jsonl)"
    first = rows[0]
    assert f"[{first['suite']}] {first['id']}" in out and f"  prompt: {first['prompt']}" in out
    judged = next(r for r in rows if r.get("verdict"))
    assert f"[{judged['suite']}] {judged['id']}: {judged['verdict']}" in out
    assert f"  response: {judged['response']}" in out

    saved = tmp_path / "r" / "responses.jsonl"
    code, _, err = run(["artifacts", "t", "--storage", url, "--trial", "2", "--out", str(saved)], capsys)
    assert code == 0 and saved.read_bytes() == stored, err
    code, _, err = run(["artifacts", "t", "--storage", url, "--trial", "2", "--out", str(saved)], capsys)
    assert code == 2 and err.strip() == f"error: --out {saved}: exists (give --overwrite to replace it)"
    code, out, err = run(["artifacts", "t", "--storage", url, "--trial", "2", "--jsonl"], capsys)
    assert code == 0 and out.encode() == stored, err

    for args, message in (
        (["--trial", "99"], "error: study 't': no trial 99 (trials 0-"),
        (["--jsonl"], "error: --out and --jsonl need --trial N (the trial whose responses to write)"),
        (["--trial", "2", "--artifacts", str(tmp_path / "elsewhere")],
         "error: trial 2: its responses-2.jsonl (artifact "),
    ):
        code, out, err = run(["artifacts", "t", "--storage", url, *args], capsys)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, (args, err)
