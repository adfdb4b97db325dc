"""``safesearch artifacts STUDY``: which trial uploaded which artifact, and a trial's responses.

Artifacts carry UUID names in the store; the trial keeps the name it was uploaded as. Without ``--trial``
this lists them (trial, state, file, artifact id); with ``--trial N`` it prints that trial's responses
for a person to read, writes them as they were stored (``--out FILE``), or prints them as JSON lines
(``--jsonl``, for scripts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from safesearch.cli.study import artifacts_option, storage_option
from safesearch.errors import UserError


@click.command("artifacts")
@click.argument("study_name", metavar="STUDY")
@storage_option
@artifacts_option
@click.option("--trial", type=click.IntRange(min=0), default=None, metavar="N",
              help="Print (or save) trial N's responses; without it, list every trial's artifacts.")
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Write trial N's responses file here, as stored (JSON lines), instead of printing it.")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
@click.option("--jsonl", is_flag=True, help="Print trial N's responses as stored (JSON lines), for scripts.")
def artifacts(study_name: str, storage_url: str | None, artifacts: Path | None, trial: int | None, out: Path | None,
              overwrite: bool, jsonl: bool) -> None:
    """List a study's artifacts by trial, or show a trial's responses."""
    from safesearch.artifacts import read_artifact, response_rows, row_text, trial_artifacts
    from safesearch.outputs import check_output_file, write_file_atomic
    from safesearch.storage import artifact_root, artifact_store_for, load_study, open_storage

    if trial is None and (out is not None or jsonl):
        raise UserError("--out and --jsonl need --trial N (the trial whose responses to write)")
    if out is not None and jsonl:
        raise UserError("give --out FILE or --jsonl, not both")
    if out is not None:
        if out.exists() and not out.is_dir() and not overwrite:
            raise UserError(f"--out {out}: exists (give --overwrite to replace it)")
        check_output_file(out, "--out")
    storage = open_storage(storage_url, heartbeat_interval=None, create=False)
    study = load_study(storage, study_name)
    root = artifact_root(storage_url, artifacts)
    store = artifact_store_for(storage_url, artifacts, create=False)
    found = trial_artifacts(study, trial)
    if trial is None:
        if not found:
            click.echo(f"study {study_name!r}: no trial has an artifact")
            return
        click.echo("trial  state     file                        artifact id")
        for a in found:
            click.echo(f"{a.trial:>5}  {a.state:<8}  {a.filename:<26}  {a.artifact_id}")
        click.echo(f"{len(found)} artifacts in {root}; `safesearch artifacts {study_name} --trial N` shows one")
        return
    responses = [a for a in found if a.filename.startswith("responses-")]
    if not responses:
        state = study.trials[trial].state.name
        raise UserError(f"study {study_name!r}: trial {trial} ({state}) has no responses artifact"
                        + (" (it did not complete)" if state != "COMPLETE" else ""))
    artifact = responses[-1]
    data = read_artifact(store, artifact, str(root))
    if out is not None:
        write_file_atomic(out, data)
        click.echo(f"trial {trial}: {artifact.filename} written to {out}", err=True)
    elif jsonl:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        rows = response_rows(data, artifact)
        click.echo(f"trial {trial} ({artifact.state}): {len(rows)} responses ({artifact.filename})")
        for row in rows:
            click.echo(row_text(row))
