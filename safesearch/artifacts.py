"""A study's artifacts by trial: which trial uploaded which file, and its content.

Each trial uploads its responses (``responses-<trial>.jsonl``: one row per item, the prompt beside the
response, verdict or choice; see ``safesearch.search``) to the study's artifact store under a UUID file
name; the trial keeps the UUID, the file name and the media type as a system attr (Optuna's artifact
meta). These functions map one to the other, for ``safesearch artifacts``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.artifacts import get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import ExperimentalWarning

from safesearch.errors import UserError


@dataclass(frozen=True)
class TrialArtifact:
    trial: int
    state: str
    artifact_id: str
    filename: str
    mimetype: str


def trial_artifacts(study: optuna.Study, trial: int | None = None) -> list[TrialArtifact]:
    """Every artifact of the study's trials (of trial number ``trial`` only, if given), by trial number."""
    trials = study.get_trials(deepcopy=False)
    if trial is not None:
        trials = [t for t in trials if t.number == trial]
        if not trials:
            last = len(study.get_trials(deepcopy=False)) - 1
            raise UserError(f"study {study.study_name!r}: no trial {trial} (trials 0-{last})" if last >= 0 else
                            f"study {study.study_name!r}: no trial {trial} (the study has none)")
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for t in trials:
            for meta in get_all_artifact_meta(t, storage=study._storage):
                found.append(TrialArtifact(t.number, t.state.name, meta.artifact_id, meta.filename, meta.mimetype))
    return found


def read_artifact(store: Any, artifact: TrialArtifact, where: str) -> bytes:
    """The artifact's bytes from ``store`` (``where``: its folder, for messages); a one-line error when the
    store does not hold it (another ``--artifacts`` folder than the workers'?)."""
    try:
        with store.open_reader(artifact.artifact_id) as f:
            return f.read()
    except ArtifactNotFound:
        raise UserError(f"trial {artifact.trial}: its {artifact.filename} (artifact {artifact.artifact_id}) is not in "
                        f"the artifact store {where} (the workers wrote to another "
                        "--artifacts folder?)") from None


def response_rows(data: bytes, artifact: TrialArtifact) -> list[dict[str, Any]]:
    """The rows of a responses artifact (JSON lines)."""
    rows = []
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"trial {artifact.trial}: {artifact.filename} line {lineno} is not JSON") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def row_text(row: dict[str, Any]) -> str:
    """One exchange for a person to read: where it comes from and how it was scored, the prompt, the answer."""
    outcome = row.get("verdict") or ("correct" if row.get("correct") else "wrong" if "correct" in row else "")
    head = f"[{row.get('suite', '?')}] {row.get('id', '?')}" + (f": {outcome}" if outcome else "")
    lines = [head, f"  prompt: {row.get('prompt', '')}"]
    if "request" in row:
        lines.append(f"  request (in the image): {row['request']}")
    if "image" in row:
        lines.append(f"  image: {row['image']}")
    if "chosen" in row:
        lines.append(f"  chosen: {row['chosen']}" + (f" (gold: {row['gold']})" if "gold" in row else ""))
    if row.get("response") is not None:
        lines.append(f"  response: {row['response']}")
    if row.get("error"):
        lines.append(f"  error: {row['error']}")
    return "\n".join(lines)
