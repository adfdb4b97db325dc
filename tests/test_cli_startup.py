"""The command line starts light: help, version and bad input answer without loading torch.

Every command imports its heavy modules (torch, transformers, vLLM, and for help also optuna, SQLAlchemy,
matplotlib) where its work needs them, so that ``--help`` and a bad spec answer in a fraction of a second
instead of the seconds torch takes to start. Checked on the import graph (``sys.modules`` after the
command, in a fresh interpreter), not on a clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "vllm")
HELP_FREE = (*HEAVY, "optuna", "sqlalchemy", "matplotlib", "optuna_dashboard", "grpc")

PROBE = """
import json, sys
from safesearch.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if "." not in m)}), file=sys.__stdout__)
"""

COMMANDS = [
    [], ["toyworld"], ["toyworld", "build"], ["demo"], ["groups"], ["merge"], ["eval"], ["suites"], ["dashboard"],
    ["study"], ["study", "create"], ["worker"], ["run"], ["pareto"], ["validate"], ["export"],
    ["launch"], ["launch", "slurm"], ["launch", "kubernetes"],
    ["storage"], ["storage", "proxy"],
]


def _probe(*args: str, cwd: Path | None = None) -> tuple[int, set[str], str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"]), r.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "safesearch")
def test_help_loads_nothing_heavy(command: list[str]) -> None:
    code, modules, err = _probe(*command, "--help")
    assert code == 0, err
    assert not modules & set(HELP_FREE), f"{' '.join(command)} --help loaded {sorted(modules & set(HELP_FREE))}"


def test_version_loads_nothing_heavy() -> None:
    code, modules, _ = _probe("--version")
    assert code == 0 and not modules & set(HELP_FREE)


def test_a_bad_spec_is_refused_before_torch_loads(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: x\ngraft: missing.yaml\n")
    for command in (["run"], ["study", "create"], ["worker"], ["groups"], ["merge"]):
        extra = ["--coef", "c.json", "--out", "o"] if command == ["merge"] else []
        code, modules, err = _probe(*command, str(tmp_path / "bad.yaml"), *extra, cwd=tmp_path)
        # (merge reads a graft spec: for it this study spec is bad for another reason, told as well)
        assert code == 2 and "bad.yaml" in err and err.count("\n") == 1, (command, err)
        assert not modules & set(HEAVY), f"{command} loaded {sorted(modules & set(HEAVY))} before refusing"


def test_a_missing_study_database_is_refused_before_torch_loads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'none' / 'x.db'}"
    for command in (["pareto", "s"], ["validate", "s"], ["export", "s", "--trial", "0", "--out", "o"]):
        code, modules, err = _probe(*command, "--storage", url, cwd=tmp_path)
        assert code == 2 and "does not exist" in err, (command, err)
        if command[0] == "pareto":  # validate and export load torch first: their work is a model's
            assert not modules & set(HEAVY), f"{command} loaded {sorted(modules & set(HEAVY))}"


STUDY_COMMANDS = (["run"], ["worker"], ["study", "create"])


def test_missing_data_or_a_bad_storage_is_refused_before_torch_loads(tmp_path: Path) -> None:
    """What a study command can check without torch comes first, in this order: the storage URL's form
    (an unknown database, a SQLite file under a file), the artifact store (run, worker), the suites' data
    files. Here the data root is empty (the checkpoints are missing too: the data is read before their
    headers), so a good storage URL gets the data's error and a bad one its own."""
    from study_world import spec_dict, write_spec

    world = tmp_path / "world"
    world.mkdir()
    spec = write_spec(tmp_path / "study.yaml", spec_dict(tmp_path, world))
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    db_dir = tmp_path / "db"
    cases = [
        (f"sqlite:///{db_dir / 's.db'}", [], "harmful_general.jsonl"),  # the data is missing
        ("nosuch://x", [], "nosuch://x"),
        (f"sqlite:///{a_file}/s.db", [], "f.txt"),
        (f"sqlite:///{db_dir / 's.db'}", ["--artifacts", str(a_file / "a")], "--artifacts"),
    ]
    for command in STUDY_COMMANDS:
        for url, extra, named in cases:
            if extra and command[0] == "study":
                continue  # study create keeps no artifacts
            code, modules, err = _probe(*command, str(spec), "--storage", url, *extra, cwd=tmp_path)
            assert code == 2 and named in err and err.count("\n") == 1, (command, url, err)
            assert "Traceback" not in err
            assert not modules & set(HEAVY), f"{command} {url} loaded {sorted(modules & set(HEAVY))} before refusing"
    assert not db_dir.exists(), "a refused command created the storage's folder"
