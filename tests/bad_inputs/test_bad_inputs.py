"""Every bad input of the corpus (``cases.py``) through the command a user runs: exactly one line on
stderr naming the input, exit code 2, no traceback, no secret printed, and nothing in the workspace, its
SQLite study database or the PostgreSQL test database added, removed or changed.

``python tests/bad_inputs/harness.py`` prints the same corpus as a table per command.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cases import CASES
from harness import check
from workspace import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(toyworld_small: Path, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    w = Workspace.create(tmp_path_factory.mktemp("bad-inputs"), toyworld_small, postgres_url)
    yield w
    w.close()


def test_the_corpus_covers_every_command() -> None:
    from safesearch.cli import _register, cli

    _register()
    commands = {c.command.split()[0] for c in CASES}
    assert len(CASES) >= 200
    assert set(cli.commands) <= commands | {"study"}, set(cli.commands) - commands
    assert {"study create", "toyworld build"} <= {c.command for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, ws: Workspace) -> None:
    outcome = check(case, ws)
    assert outcome.clean, outcome.explain()
