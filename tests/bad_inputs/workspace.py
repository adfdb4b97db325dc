"""The workspace the bad inputs run in: what a user has on disk when they make their mistakes.

``root`` is the working directory of every case:

- ``storage/toyworld/``: a copy of the small toy world (aligned, unaligned, medical; the search and
  holdout data), so that the toy suites' relative paths resolve with ``root`` as the data root and a
  case that deletes a checkpoint deletes only this copy;
- ``specs/graft.yaml``, ``specs/study.yaml`` (study ``t``), ``specs/coef.json``: valid inputs the
  cases start from;
- ``db/safesearch.db``: study ``t`` run to its 4 trials (plus one FAIL trial), study ``empty`` (created,
  never worked), study ``plain`` (made by Optuna alone, no safesearch spec).

After a case that changed anything, :meth:`Workspace.restore` puts the pristine copy back.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from study_world import GRAFT  # noqa: E402


class Workspace:
    def __init__(self, root: Path, pristine: Path, world: Path, postgres_url: str | None) -> None:
        self.root, self.pristine, self.world, self.postgres_url = root, pristine, world, postgres_url
        self.graft = root / "specs" / "graft.yaml"
        self.spec = root / "specs" / "study.yaml"
        self.coef = root / "specs" / "coef.json"
        self.db = root / "db" / "safesearch.db"
        self.url = f"sqlite:///{self.db}"
        self._held: list[socket.socket] = []

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def create(cls, tmp: Path, source_world: Path | None = None, postgres_url: str | None = None) -> Workspace:
        from harness import _captured

        if source_world is None:
            from safesearch.toyworld.build import build

            source_world = HERE.parent.parent / "storage" / ".test-cache" / "toyworld-small-0"
            build(source_world, seed=0, profile="small")
        root = tmp / "ws"
        world = root / "storage" / "toyworld"
        for name in ("aligned", "unaligned", "medical"):
            shutil.copytree(source_world / name, world / name)
        for split in ("search", "holdout"):
            shutil.copytree(source_world / "data" / split, world / "data" / split)
        ws = cls(root, tmp / "pristine", world, postgres_url or os.environ.get("SAFESEARCH_TEST_POSTGRES")
                 or "postgresql+psycopg://postgres@127.0.0.1:5432/test")
        ws.write_yaml(ws.graft, ws.graft_dict())
        ws.write_yaml(ws.spec, ws.study_dict())
        ws.coef.write_text(json.dumps({"safety": {"*": 0.5}, "medical": {"*": 0.1}}))
        from safesearch.cli import main

        with _captured():
            try:
                main(["run", str(ws.spec), "--storage", ws.url])
                empty = ws.study_dict(name="empty")
                main(["study", "create", str(ws.write_yaml(root / "specs" / "empty.yaml", empty)), "--storage", ws.url])
            except SystemExit as e:
                if e.code:
                    raise RuntimeError(f"workspace set-up failed (exit {e.code})") from None
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        t = optuna.load_study(study_name="t", storage=ws.url)
        t.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
        plain = optuna.create_study(study_name="plain", storage=ws.url)
        plain.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        shutil.copytree(root, ws.pristine, symlinks=True)
        return ws

    def graft_dict(self) -> dict[str, Any]:
        g = copy.deepcopy(GRAFT)
        g["checkpoints"] = {n: f"../storage/toyworld/{n}" for n in g["checkpoints"]}
        return g

    def study_dict(self, name: str = "t") -> dict[str, Any]:
        """A small study on the workspace's world (graft inline, paths relative to specs/)."""
        return {
            "name": name,
            "graft": "graft.yaml",
            "data_root": "../storage/toyworld",
            "search": {"safety": {"range": [0.0, 1.0]}, "medical": {"range": [-0.3, 0.3]}},
            "objectives": [
                {"name": "safety", "suites": ["toy-harmful-general", "toy-harmful-medical"], "subset": 8,
                 "holdout_subset": 8},
                {"name": "medical", "suite": "toy-mcq-medical", "subset": 8, "holdout_subset": 8},
            ],
            "constraints": [
                {"name": "over_refusal", "suite": "toy-benign", "subset": 8, "holdout_subset": 8, "max": 0.1}
            ],
            "baselines": {"zero": True, "global_lambda": {"vector": "safety", "values": [0.5]}},
            "sampler": "tpe",
            "seed": 0,
            "n_trials": 4,
        }

    @staticmethod
    def write_yaml(path: Path, data: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # -- per case ------------------------------------------------------------------------------------

    def case_dir(self, case: Any) -> Path:
        slug = "".join(c if c.isalnum() else "-" for c in case.id)[:80].strip("-")
        d = self.root / "cases" / slug
        d.mkdir(parents=True, exist_ok=True)
        return d

    def copy_checkpoint(self, name: str, dest: Path) -> Path:
        shutil.copytree(self.world / name, dest)
        return dest

    def hold_port(self) -> int:
        """A port on 127.0.0.1 that something is listening on (until :meth:`close`)."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self._held.append(s)
        return s.getsockname()[1]

    def restore(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(self.pristine, self.root, symlinks=True)

    def close(self) -> None:
        for s in self._held:
            s.close()
        self._held.clear()
