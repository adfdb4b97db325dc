"""Running the ``safesearch`` command line in the test's process, as a user would from a shell."""

from __future__ import annotations

from typing import Any

import pytest

from safesearch.cli import main


def run_cli(capsys: pytest.CaptureFixture, *args: Any) -> tuple[int, str, str]:
    """``safesearch ARGS``: (exit code, stdout, stderr). What was printed before (building checkpoints) is dropped."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
