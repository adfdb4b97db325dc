"""``safesearch launch slurm|kubernetes SPEC --workers N``: the file that starts N workers on a cluster.

The spec must exist and be YAML; its study name names the job. ``safesearch study create SPEC`` checks
the rest once before the workers start (it needs the spec's backend, which the machine that renders may
lack). What the files hold and why: :mod:`safesearch.launch` and docs/cluster.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from safesearch.errors import UserError
from safesearch.launch import KubernetesJob, SlurmJob, job_name, render_kubernetes, render_slurm

workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    required=True,
    metavar="N",
    help="How many workers (one GPU each).",
)
name_option = click.option("--name", default=None, help="The job's name (default: safesearch-STUDY).")
safesearch_option = click.option(
    "--safesearch",
    "safesearch_cmd",
    default="safesearch",
    show_default=True,
    metavar="CMD",
    help="How a worker runs safesearch, e.g. '.venv/bin/safesearch' or 'apptainer exec --nv IMG.sif safesearch'.",
)
out_option = click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Write the file here (default: print it).",
)


@click.group("launch")
def launch() -> None:
    """Render a ready-to-submit file that starts N workers of a study on a cluster (see docs/cluster.md)."""


def _study_name(spec_path: Path) -> str:
    """The study's name (that of the job), from the spec read as YAML. Checking it all would need its
    backend (vLLM checks its engine options), which the machine that renders may lack:
    ``safesearch study create SPEC`` checks everything, once, before the workers start."""
    from safesearch.textfiles import read_yaml

    data = read_yaml(spec_path, "study spec")
    if not isinstance(data, dict):
        got = "nothing (an empty file)" if data is None else type(data).__name__
        raise UserError(f"{spec_path}: the study spec: expected a mapping, got {got}")
    name = data.get("name")
    return name if isinstance(name, str) and name.strip() else spec_path.stem


def _emit(text: str, out: Path | None, submit: str, spec_path: Path) -> None:
    """``text`` on stdout, or into ``out`` through a temporary file and a rename (never half-written);
    ``out`` may replace an earlier rendering, never the spec it renders."""
    if out is None:
        click.echo(text, nl=False)
        return
    from safesearch.outputs import check_output_file

    if out.resolve() == spec_path.resolve():
        raise UserError(f"--out {out}: is the study spec SPEC; choose another file")
    check_output_file(out, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain file would be (mkstemp makes it 0600)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    click.echo(f"wrote {out}; submit with `{submit} {out}`", err=True)


@launch.command("slurm")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@workers_option
@name_option
@click.option("--partition", default=None, help="The Slurm partition (default: the cluster's).")
@click.option("--time", "time_limit", default="24:00:00", show_default=True, help="Time limit of each task.")
@click.option(
    "--cpus-per-task",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    metavar="C",
    help="CPUs of each task; the worker's --threads.",
)
@click.option("--gres", default="gpu:1", show_default=True, help="The GPU of each task (e.g. gpu:a100:1).")
@click.option("--mem", default=None, help="Memory of each task (e.g. 64G; default: the cluster's).")
@click.option(
    "--setup",
    multiple=True,
    metavar="LINE",
    help="A shell line run before the worker, e.g. 'source /shared/venv/bin/activate' (repeatable).",
)
@safesearch_option
@click.option(
    "--storage-file",
    default=None,
    metavar="FILE",
    help="Read the storage URL from FILE on the cluster (default: $SAFESEARCH_STORAGE as sbatch passes it on).",
)
@click.option("--artifacts", default=None, metavar="DIR", help="Shared artifact directory of the workers.")
@click.option(
    "--chdir",
    default=None,
    metavar="DIR",
    help="The tasks' working directory (default: where sbatch is called).",
)
@out_option
def slurm(
    spec_path: Path,
    workers: int,
    name: str | None,
    partition: str | None,
    time_limit: str,
    cpus_per_task: int,
    gres: str,
    mem: str | None,
    setup: tuple[str, ...],
    safesearch_cmd: str,
    storage_file: str | None,
    artifacts: str | None,
    chdir: str | None,
    out: Path | None,
) -> None:
    """An sbatch script: an array job of N tasks, one GPU and one `safesearch worker SPEC` each.

    SPEC is written as given: relative to where sbatch is called (or to --chdir)."""
    study = _study_name(spec_path)
    job = SlurmJob(
        spec=str(spec_path),
        workers=workers,
        name=name or job_name(study),
        cpus_per_task=cpus_per_task,
        time=time_limit,
        gres=gres,
        partition=partition,
        mem=mem,
        setup=setup,
        safesearch=safesearch_cmd,
        storage_file=storage_file,
        artifacts=artifacts,
        chdir=chdir,
    )
    _emit(render_slurm(job), out, "sbatch", spec_path)


@launch.command("kubernetes")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@workers_option
@click.option("--image", required=True, help="The container image that has safesearch.")
@name_option
@click.option("--namespace", default=None, help="The Job's namespace (default: kubectl's).")
@click.option(
    "--secret",
    default="safesearch-storage",
    show_default=True,
    help="The Secret that holds the storage URL.",
)
@click.option("--secret-key", default="url", show_default=True, help="The key of the URL in the Secret.")
@click.option(
    "--cpus",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    metavar="C",
    help="CPUs each pod requests; the worker's --threads.",
)
@click.option("--memory", default=None, help="Memory of each pod, e.g. 64Gi (request and limit).")
@click.option(
    "--artifacts-pvc",
    default=None,
    metavar="CLAIM",
    help="A shared PersistentVolumeClaim for the responses, mounted and passed as --artifacts.",
)
@click.option(
    "--artifacts-path",
    default="/artifacts",
    show_default=True,
    metavar="PATH",
    help="Where --artifacts-pvc is mounted.",
)
@click.option(
    "--mount",
    "mounts",
    multiple=True,
    metavar="CLAIM:PATH",
    help="Another PersistentVolumeClaim to mount, e.g. the checkpoints and data (repeatable).",
)
@click.option("--workdir", default=None, metavar="PATH", help="The container's working directory.")
@safesearch_option
@click.option(
    "--backoff-limit",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Failed pods replaced before the Job gives up (default: 2 per worker).",
)
@out_option
def kubernetes(
    spec_path: Path,
    workers: int,
    image: str,
    name: str | None,
    namespace: str | None,
    secret: str,
    secret_key: str,
    cpus: int,
    memory: str | None,
    artifacts_pvc: str | None,
    artifacts_path: str,
    mounts: tuple[str, ...],
    workdir: str | None,
    safesearch_cmd: str,
    backoff_limit: int | None,
    out: Path | None,
) -> None:
    """A batch/v1 Job of N pods, one GPU and one `safesearch worker SPEC` each, the storage URL from a Secret.

    SPEC is written as given: the path where the container finds it (from --workdir)."""
    study = _study_name(spec_path)
    job = KubernetesJob(
        spec=str(spec_path),
        workers=workers,
        name=name or job_name(study),
        image=image,
        secret=secret,
        secret_key=secret_key,
        cpus=cpus,
        memory=memory,
        namespace=namespace,
        artifacts_pvc=artifacts_pvc,
        artifacts_path=artifacts_path,
        mounts=mounts,
        workdir=workdir,
        safesearch=safesearch_cmd,
        backoff_limit=backoff_limit,
    )
    _emit(render_kubernetes(job), out, "kubectl apply -f", spec_path)
