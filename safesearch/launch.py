"""Launch recipes for clusters: the file that starts N workers of one study, ready to submit.

- :func:`render_slurm`: an sbatch script, an array job of N tasks, one GPU and one worker each;
- :func:`render_kubernetes`: a batch/v1 Job of N pods (``parallelism`` = ``completions`` = N), one GPU and
  one worker each.

Both keep the storage URL out of the file, since it may hold a password and such files get committed,
mailed and printed: Slurm reads it from the environment ``sbatch`` passes on (or from a file named in the
script), Kubernetes from a Secret. Neither puts it on the worker's command line either (``ps`` shows
that to every user of the node): the worker reads ``$SAFESEARCH_STORAGE`` itself.

Every worker sees its one GPU as ``cuda:0``: Slurm and the NVIDIA device plugin hide the others
(``CUDA_VISIBLE_DEVICES``, ``NVIDIA_VISIBLE_DEVICES``). Its torch threads are the CPUs the recipe asks
for, given as ``--threads``, since a scheduler's CPU quota is not visible to the worker's own default
(see :mod:`safesearch.threads`).

Workers are safe to restart: a worker that dies mid-trial stops its heartbeat, and the storage fails and
retries its trial elsewhere. So a worker lost to preemption or a failed node is requeued (Slurm) or
replaced (Kubernetes, also after a crash), rather than ending the job.

The renderers are pure (text in, text out) and check every value that lands in the file, so that a value
cannot break the file's syntax (a newline in an ``#SBATCH`` line, a Kubernetes name with capitals):
each mistake is one :class:`~safesearch.errors.UserError` naming the flag.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from safesearch.errors import UserError

STORAGE_ENV = "SAFESEARCH_STORAGE"
DEVICE = "cuda:0"  # every worker's one GPU, whichever it is on the machine

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
_SLURM_MEM = re.compile(r"\d+[KMGT]?")
_SLURM_WORD = re.compile(r"[A-Za-z0-9_.,:%+-]+")
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NO_SPACE = re.compile(r"\S+")


# -- checks ---------------------------------------------------------------------------------------------


def check_dns_subdomain(value: str, flag: str) -> str:
    """A Kubernetes object name (RFC 1123 subdomain: Secrets, PersistentVolumeClaims)."""
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in value.split(".")):
        raise UserError(
            f"{flag} {value!r}: not a valid Kubernetes name (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters)"
        )
    return value


def check_dns_label(value: str, flag: str) -> str:
    """A Kubernetes name that must also fit a label (RFC 1123 label: Jobs, namespaces)."""
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise UserError(
            f"{flag} {value!r}: not a valid Kubernetes name (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    return value


def check_secret_key(value: str, flag: str) -> str:
    """A key of a Secret's data (what ``secretKeyRef.key`` names)."""
    if len(value) > 253 or not _SECRET_KEY.fullmatch(value):
        raise UserError(
            f"{flag} {value!r}: not a valid key of a Kubernetes Secret (letters, digits, '-', '_', '.')"
        )
    return value


def check_quantity(value: str, flag: str) -> str:
    """A Kubernetes resource quantity: the API server would refuse the whole Job over a bad one."""
    if not _QUANTITY.fullmatch(value):
        raise UserError(f"{flag} {value!r}: not a Kubernetes quantity (such as 32Gi or 500M)")
    return value


def check_one_line(value: str, flag: str) -> str:
    """A value written into the file as is: it must not end its line (that would add lines of its own)."""
    if not value.strip() or "\n" in value or "\r" in value:
        raise UserError(f"{flag} {value!r}: must be one non-empty line")
    return value


def check_slurm(value: str, pattern: re.Pattern[str], flag: str, what: str) -> str:
    """A value of an ``#SBATCH`` line: sbatch cannot quote, so anything outside ``pattern`` is refused."""
    if not pattern.fullmatch(value):
        raise UserError(f"{flag} {value!r}: not {what}")
    return value


def check_command(value: str, flag: str) -> list[str]:
    """How the worker runs safesearch, as shell words (``.venv/bin/safesearch``, ``apptainer exec ...``)."""
    check_one_line(value, flag)
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise UserError(f"{flag} {value!r}: not a command line ({e})") from None
    if not words:
        raise UserError(f"{flag} {value!r}: must be one non-empty line")
    return words


def check_mount(value: str, flag: str) -> tuple[str, str]:
    """``CLAIM:/path``: a PersistentVolumeClaim and where the container sees it."""
    claim, sep, path = value.partition(":")
    if not sep or not path.startswith("/"):
        raise UserError(f"{flag} {value!r}: give CLAIM:/absolute/path")
    return check_dns_subdomain(claim, flag), check_one_line(path, flag)


def job_name(study: str) -> str:
    """A default job name from the study's name that fits every scheduler's rules (a DNS label)."""
    slug = re.sub(r"[^a-z0-9]+", "-", study.lower()).strip("-")
    return f"safesearch-{slug}"[:63].rstrip("-") if slug else "safesearch"


# -- the worker ---------------------------------------------------------------------------------------


def worker_args(spec: str, threads: int, artifacts: str | None = None) -> list[str]:
    """What follows ``safesearch`` on every worker's command line. No ``--storage``: the worker reads
    ``$SAFESEARCH_STORAGE`` itself, and a URL on a command line shows in ``ps``."""
    args = ["worker", spec, "--device", DEVICE, "--threads", str(threads)]
    return [*args, "--artifacts", artifacts] if artifacts else args


# -- Slurm ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmJob:
    """An array job of ``workers`` tasks; the values as the flags of ``safesearch launch slurm`` give them."""

    spec: str
    workers: int
    name: str
    cpus_per_task: int = 4
    time: str = "24:00:00"
    gres: str = "gpu:1"
    partition: str | None = None
    mem: str | None = None
    setup: Sequence[str] = ()
    safesearch: str = "safesearch"
    storage_file: str | None = None
    artifacts: str | None = None
    chdir: str | None = None

    def check(self) -> None:
        """Every value that lands in the script, each mistake named by its flag."""
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: should be at least 1")
        if self.cpus_per_task < 1:
            raise UserError(f"--cpus-per-task {self.cpus_per_task}: should be at least 1")
        check_slurm(self.name, _SLURM_NAME, "--name", "a job name (letters, digits, _ . -)")
        check_slurm(self.time, _SLURM_TIME, "--time", "a Slurm time limit (MINUTES, H:MM:SS or D-HH:MM:SS)")
        check_slurm(
            self.gres, _SLURM_WORD, "--gres", "a Slurm generic resource (such as gpu:1 or gpu:a100:1)"
        )
        if self.partition is not None:
            check_slurm(self.partition, _SLURM_WORD, "--partition", "a Slurm partition name")
        if self.mem is not None:
            check_slurm(self.mem, _SLURM_MEM, "--mem", "a Slurm memory size (such as 32G)")
        for line in self.setup:
            check_one_line(line, "--setup")
        check_command(self.safesearch, "--safesearch")
        if self.storage_file is not None:
            check_one_line(self.storage_file, "--storage-file")
        if self.artifacts is not None:
            check_one_line(self.artifacts, "--artifacts")
        if self.chdir is not None:
            check_slurm(self.chdir, _NO_SPACE, "--chdir", "one path without spaces (#SBATCH cannot quote it)")


def render_slurm(job: SlurmJob) -> str:
    """The sbatch script of ``job`` (checked first)."""
    job.check()
    directives = [
        f"--job-name={job.name}",
        f"--array=0-{job.workers - 1}",
        "--ntasks=1",
        f"--cpus-per-task={job.cpus_per_task}",
        f"--gres={job.gres}",
        f"--time={job.time}",
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--mem={job.mem}"] if job.mem else []),
        *([f"--chdir={job.chdir}"] if job.chdir else []),
        "--requeue",
        "--output=%x-%A_%a.out",
    ]
    if job.storage_file:
        storage = [
            f"# The storage URL (it may hold a password) is read from {job.storage_file} (keep it chmod 600),",
            "# never written here.",
            f'{STORAGE_ENV}="$(cat -- {shlex.quote(job.storage_file)})"',
            f"export {STORAGE_ENV}",
        ]
    else:
        storage = [
            "# The storage URL (it may hold a password) is never written here: sbatch passes on the",
            f"# environment it is called in, so `export {STORAGE_ENV}=postgresql+psycopg://...` before `sbatch`",
            "# (or render with --storage-file FILE to read it from a file).",
        ]
    storage.append(
        f': "${{{STORAGE_ENV}:?is not set: export it before sbatch, or render with --storage-file}}"'
    )
    setup = list(job.setup) or [
        "# (the environment that has safesearch: render with --setup 'source VENV/bin/activate')"
    ]
    args = worker_args(job.spec, job.cpus_per_task, job.artifacts)
    lines = [
        "#!/bin/bash",
        f"# {job.workers} safesearch worker(s) of one study as a Slurm array job: one task, one GPU, one worker each.",
        "# Rendered by `safesearch launch slurm`; submit with `sbatch FILE`. Slurm may requeue a task that is",
        "# preempted or whose node fails: workers are safe to restart, the storage retries a dead worker's trial.",
        *(f"#SBATCH {d}" for d in directives),
        "set -eo pipefail",
        "",
        *storage,
        "",
        *setup,
        "",
        f"# The task runs in {job.chdir or 'the directory sbatch is called from'}: relative paths (the spec's) start there.",
        "# Slurm gives each task its GPU through CUDA_VISIBLE_DEVICES, where it is cuda:0; --threads is the",
        "# task's CPUs. The worker reads $SAFESEARCH_STORAGE itself (a URL on its command line would show in",
        "# ps). At the time limit Slurm's SIGTERM fails the running trial, which another worker runs again.",
        f"exec {job.safesearch} {shlex.join(args)}",
    ]
    return "\n".join(lines) + "\n"


# -- Kubernetes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubernetesJob:
    """A Job of ``workers`` pods; the values as the flags of ``safesearch launch kubernetes`` give them."""

    spec: str
    workers: int
    name: str
    image: str
    secret: str = "safesearch-storage"
    secret_key: str = "url"
    cpus: int = 4
    memory: str | None = None
    namespace: str | None = None
    artifacts_pvc: str | None = None
    artifacts_path: str = "/artifacts"
    mounts: Sequence[str] = ()  # CLAIM:/path
    workdir: str | None = None
    safesearch: str = "safesearch"
    backoff_limit: int | None = None  # default: 2 per worker
    gpu_resource: str = "nvidia.com/gpu"

    def check(self) -> None:
        """Every value that lands in the Job, each mistake named by its flag."""
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: should be at least 1")
        if self.cpus < 1:
            raise UserError(f"--cpus {self.cpus}: should be at least 1")
        if self.backoff_limit is not None and self.backoff_limit < 0:
            raise UserError(f"--backoff-limit {self.backoff_limit}: should be 0 or more")
        check_dns_label(self.name, "--name")
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise UserError(f"--image {self.image!r}: not a container image reference")
        check_dns_subdomain(self.secret, "--secret")
        check_secret_key(self.secret_key, "--secret-key")
        if self.memory is not None:
            check_quantity(self.memory, "--memory")
        if self.namespace is not None:
            check_dns_label(self.namespace, "--namespace")
        if self.artifacts_pvc is not None:
            check_dns_subdomain(self.artifacts_pvc, "--artifacts-pvc")
        if not self.artifacts_path.startswith("/"):
            raise UserError(f"--artifacts-path {self.artifacts_path!r}: must be an absolute path")
        check_one_line(self.artifacts_path, "--artifacts-path")
        paths = [check_mount(m, "--mount")[1] for m in self.mounts]
        paths += [self.artifacts_path] if self.artifacts_pvc else []
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise UserError(
                f"--mount: {twice[0]} is mounted twice (a pod cannot mount two volumes at one path)"
            )
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise UserError(f"--workdir {self.workdir!r}: must be an absolute path")
        check_command(self.safesearch, "--safesearch")


def kubernetes_manifest(job: KubernetesJob) -> dict:
    """The Job of ``job`` (checked first) as plain data."""
    job.check()
    labels = {"app.kubernetes.io/name": "safesearch", "app.kubernetes.io/component": "worker"}
    mounts = [check_mount(m, "--mount") for m in job.mounts]
    volumes = [
        {"name": f"data-{i}", "persistentVolumeClaim": {"claimName": c}} for i, (c, _) in enumerate(mounts)
    ]
    volume_mounts = [{"name": f"data-{i}", "mountPath": p} for i, (_, p) in enumerate(mounts)]
    if job.artifacts_pvc:
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": job.artifacts_pvc}})
        volume_mounts.append({"name": "artifacts", "mountPath": job.artifacts_path})
    args = worker_args(job.spec, job.cpus, job.artifacts_path if job.artifacts_pvc else None)
    resources: dict = {"requests": {"cpu": str(job.cpus)}, "limits": {job.gpu_resource: 1}}
    if job.memory:
        resources["requests"]["memory"] = job.memory
        resources["limits"]["memory"] = job.memory
    container: dict = {
        "name": "worker",
        "image": job.image,
        **({"workingDir": job.workdir} if job.workdir else {}),
        "command": [*check_command(job.safesearch, "--safesearch"), *args],
        "env": [
            {
                "name": STORAGE_ENV,
                "valueFrom": {"secretKeyRef": {"name": job.secret, "key": job.secret_key}},
            }
        ],
        "resources": resources,
        **({"volumeMounts": volume_mounts} if volume_mounts else {}),
    }
    metadata: dict = {
        "name": job.name,
        **({"namespace": job.namespace} if job.namespace else {}),
        "labels": labels,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "parallelism": job.workers,
            "completions": job.workers,
            # A failed worker is replaced by a new pod (restartPolicy Never) up to this many times in all;
            # an evicted or preempted pod does not count (podFailurePolicy).
            "backoffLimit": 2 * job.workers if job.backoff_limit is None else job.backoff_limit,
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {
                "metadata": {"labels": dict(labels)},  # a copy: YAML would print an anchor and an alias
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    **({"volumes": volumes} if volumes else {}),
                },
            },
        },
    }


def render_kubernetes(job: KubernetesJob) -> str:
    """The Job of ``job`` as YAML, after a header that says how to submit it and make its Secret."""
    body = yaml.safe_dump(kubernetes_manifest(job), sort_keys=False, default_flow_style=False)
    ns = f" -n {job.namespace}" if job.namespace else ""
    header = [
        f"# {job.workers} safesearch worker(s) of one study as a Kubernetes Job: one pod, one GPU, one worker each.",
        f"# Rendered by `safesearch launch kubernetes`; submit with `kubectl{ns} apply -f FILE`.",
        f"# The storage URL comes from the Secret {job.secret} (key {job.secret_key}), never from this file; make it",
        f'# once with `kubectl{ns} create secret generic {job.secret} --from-literal={job.secret_key}="${STORAGE_ENV}"`.',
        "# Each pod sees its GPU as cuda:0; --threads is its CPU request. Workers are safe to restart:",
        "# the storage retries a dead worker's trial, so failed pods are replaced (backoffLimit).",
    ]
    return "\n".join(header) + "\n" + body
