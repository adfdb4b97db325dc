"""The example suites ship inside the package: suite names resolve from any directory, after a plain
(non-editable) install too, and ``safesearch suites`` shows each suite's split rule and items per split."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from safesearch.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    """pyproject lists the packages (objectives/ installs as safesearch.objectives): a new subpackage
    missing from the list would be missing from every non-editable install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "safesearch").rglob("__init__.py")}
    assert found | {"safesearch.objectives"} == listed


def test_suite_names_resolve_from_any_directory(toyworld_small: Path, tmp_path: Path, monkeypatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # no ./objectives here
    main(["suites", "toy-benign", "toy-mcq-medical", "--data-root", str(toyworld_small), "--json"])
    rows = {r["suite"]: r for r in json.loads(capsys.readouterr().out)}
    benign = rows["toy-benign"]
    assert Path(benign["source"]).parent == ROOT / "objectives"  # the installed (here: editable) suites
    assert benign["items"] == {"search": 198, "holdout": 239} and benign["default_split"] == "holdout"
    assert benign["split_rule"] == "published (the file per {split})" and not benign["problems"]
    main(["suites", "toy-benign", "--data-root", str(toyworld_small)])
    assert "198" in capsys.readouterr().out
    # ./objectives takes precedence over the installed suites, --suites-dir over both.
    (tmp_path / "objectives").mkdir()
    (tmp_path / "objectives" / "toy-benign.yaml").write_text(
        "metric: over_refusal\ndataset: {format: jsonl, path: 'data/{split}/benign.jsonl', split: search}\n")
    main(["suites", "toy-benign", "--data-root", str(toyworld_small), "--json"])
    mine = json.loads(capsys.readouterr().out)[0]
    assert Path(mine["source"]).resolve() == (tmp_path / "objectives" / "toy-benign.yaml").resolve()
    assert mine["default_split"] == "search"


@pytest.mark.slow
def test_a_non_editable_install_carries_the_example_suites(tmp_path: Path) -> None:
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "w"),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "w").glob("safesearch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"safesearch/objectives/{p.name}" for p in (ROOT / "objectives").glob("*.yaml")}
    assert shipped and shipped <= names and "safesearch/objectives/README.md" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import safesearch; "
             "from safesearch.suites import find_suite, load_suite; "
             "print(safesearch.__file__); print(find_suite('hexphi')); print(load_suite('mm-safetybench-qr').attack)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=elsewhere, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, check=True)
    module, suite, attack = done.stdout.split()
    assert Path(module).is_relative_to(target)  # the installed copy, not the source tree
    assert Path(suite) == target / "safesearch" / "objectives" / "hexphi.yaml" and attack == "qr"
