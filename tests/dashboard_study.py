"""A small finished study for the dashboard's tests and screenshots, made as a user makes one: `safesearch
run` then `safesearch validate` on the small toy world.

Its over-refusal bound (0.0, on 60 benign requests) is one that the searched trials break: the trials of
highest safety are infeasible, so a dashboard that ignored constraints would show another front than
`safesearch pareto` (its feasible front is the zero baseline), which is what the tests must be able to see.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from study_world import spec_dict, write_spec

from safesearch.cli import main

NAME = "dash"


def make_dashboard_study(root: Path, world: Path) -> dict[str, Any]:
    """Run and validate the study under ``root``; returns its spec path, storage URL and artifact store."""
    spec = spec_dict(root, world, subset=10, n_trials=8, name=NAME)
    spec["constraints"][0].update(max=0.0, subset=60)
    spec["baselines"]["global_lambda"]["values"] = [0.5, 1.0]
    path = write_spec(root / "studies" / f"{NAME}.yaml", spec)
    url = f"sqlite:///{root / 'store' / 'safesearch.db'}"
    for args in (["run", str(path), "--storage", url], ["validate", NAME, "--storage", url]):
        try:
            main(args)
        except SystemExit as e:
            if e.code:
                raise AssertionError(f"safesearch {' '.join(args)} exited {e.code}") from None
    return {"name": NAME, "spec": path, "url": url, "artifacts": root / "store" / "artifacts"}


@contextlib.contextmanager
def served_dashboard(made: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """`safesearch dashboard --port 0` on the study ``made`` in a subprocess: (base URL, the study's id)."""
    safesearch = str(Path(sys.executable).with_name("safesearch"))
    server = subprocess.Popen(
        [safesearch, "dashboard", "--storage", made["url"], "--port", "0", "--artifacts", str(made["artifacts"])],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "SAFESEARCH_STORAGE": ""},
    )
    try:
        line = server.stderr.readline()  # the command announces its address once it listens
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"no address announced: {line!r}{server.stderr.read() if server.poll() is not None else ''}"
        base = f"http://127.0.0.1:{m.group(1)}"
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
            (study_id,) = [s["study_id"] for s in json.load(r)["study_summaries"] if s["study_name"] == made["name"]]
        yield base, study_id
    finally:
        server.terminate()
        server.wait(timeout=10)
