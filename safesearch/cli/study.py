"""The search commands: ``study create``, ``worker``, ``run``, ``pareto``, ``validate``, ``export``.

A study lives in the storage (``--storage URL``, else ``$SAFESEARCH_STORAGE``, else
``sqlite:///storage/safesearch.db``) and keeps its spec, so that everything after ``create`` names it
by its study name alone. Workers on other machines start with the same spec file and a PostgreSQL URL;
``--artifacts`` (or ``$SAFESEARCH_ARTIFACTS``) then names a shared directory for the responses.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safesearch import interrupts
from safesearch.errors import UserError
from safesearch.frontplot import plot_front
from safesearch.pareto import PICKS, TrialRecord, front, picks, records
from safesearch.studyspec import BACKENDS, StudySpec, load_study_spec
from safesearch.threads import ThreadChoice, apply_threads, choose_threads

STORAGE_HELP = "Study storage (default: $SAFESEARCH_STORAGE or sqlite:///storage/safesearch.db)."
ARTIFACTS_HELP = "Artifact store for the trials' responses (default: next to a SQLite file, else storage/artifacts)."
storage_option = click.option("--storage", "storage_url", default=None, metavar="URL", help=STORAGE_HELP)
artifacts_option = click.option("--artifacts", type=click.Path(path_type=Path), default=None, metavar="DIR",
                                help=ARTIFACTS_HELP)
device_option = click.option("--device", default=None, help="cpu, cuda, cuda:N (default: the spec's).")
backend_option = click.option("--backend", type=click.Choice(BACKENDS), default=None,
                              help="The backend of this worker (default: the spec's).")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                              help="torch threads of this process (default: $OMP_NUM_THREADS, else the usable "
                                   "CPUs / --workers-per-machine).")
workers_per_machine_option = click.option("--workers-per-machine", type=click.IntRange(min=1), default=1,
                                          metavar="K", show_default=True,
                                          help="Workers sharing this machine's CPUs (divides the default --threads).")


def _with_backend(spec: StudySpec, backend: str | None) -> StudySpec:
    """The spec served with ``--backend``: the spec's backend_options belong to its own backend and are dropped."""
    from dataclasses import replace

    if backend is None or backend == spec.backend:
        return spec
    return replace(spec, backend=backend, backend_options={})


def _quiet_transformers() -> None:
    import optuna
    from transformers.utils import logging as hf_logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


# -- the study -------------------------------------------------------------------------------------------


def _check_storage_url(storage_url: str | None) -> None:
    """The storage URL's form, without torch and without asking a server (that is
    :func:`_check_before_loading`'s): a database and driver this project supports, a ``grpc://HOST:PORT``,
    and for SQLite, a file that is a database or can be made (its folder exists or can be made, and is
    writable). Creates nothing."""
    from safesearch.proxy import is_proxy_url, proxy_address
    from safesearch.storage import _parse, is_sqlite, probe_storage, resolve_url

    url = resolve_url(storage_url)
    if is_proxy_url(url):
        proxy_address(url)
    elif is_sqlite(url):
        probe_storage(url)  # a local file: read, never written
    else:
        _parse(url)


def _check_inputs(spec: StudySpec, storage_url: str | None, *, serves: bool = True, artifacts: Path | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """What is checked before torch loads, in this order: the storage URL's form
    (:func:`_check_storage_url`); for a command that serves trials (``serves``), the artifact store and
    ``--device``'s name; every suite's items, read (a missing data file: reading items needs no torch).
    Returns the search split's tasks, their judges not built yet (see :func:`_plan`)."""
    from safesearch.devices import check_device_name
    from safesearch.evaluate import attack_notes
    from safesearch.outputs import check_output_dir_writable
    from safesearch.search import prepare_tasks, search_refs
    from safesearch.storage import artifact_root

    _check_storage_url(storage_url)
    if serves:
        check_output_dir_writable(artifact_root(storage_url, artifacts), "--artifacts")
        check_device_name(device, "--device")
    tasks = prepare_tasks(search_refs(spec), spec.data_root, judges=False)
    err = Console(stderr=True, soft_wrap=True)
    for note in dict.fromkeys(n for t in tasks.values() for n in attack_notes(t.suite, t.items)):
        err.print(f"note: {note}", markup=False)
    return tasks


def _plan(spec: StudySpec, tasks: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """What can be checked once torch is loaded, before any model is loaded or anything stored (after
    :func:`_check_inputs`, which read ``tasks``): the checkpoints' headers (a missing or corrupt
    checkpoint), the search space and its ranges, the anchor's config (a backend that cannot run it,
    images it cannot take), then the suites' judges (a guard judge loads its model). Returns the search
    space and the record of the search items read (``items_record``), which the study keeps at creation
    and compares when joining."""
    from safesearch.search import build_judges, check_anchor, items_record, search_space

    interrupts.import_native()  # the input was checked without torch; from here on the work needs it
    _quiet_transformers()
    space = search_space(spec)  # the checkpoints' headers first: they name a missing anchor best
    space.baseline_params(spec)  # a baseline outside the space's ranges, refused before anything is stored
    check_anchor(spec, tasks)
    build_judges(tasks, spec.data_root)  # checked here, built again by the worker on its device
    return space, items_record(tasks)


def _check_before_loading(spec: StudySpec, storage_url: str | None, device: str | None,
                          searched: dict[str, Any]) -> Any:
    """Before a worker loads its model: the devices (CUDA present), the storage (its server asked; created
    nothing: a model that then fails to load leaves no database behind; the artifact store was checked by
    :func:`_check_inputs`). Returns the existing study of that name (checked to accept this spec) or None."""
    from safesearch.devices import check_device
    from safesearch.search import check_joinable, spec_where
    from safesearch.storage import load_study, probe_storage

    check_device(device, "--device")
    check_device(spec.device, f"{spec_where(spec)}: device")
    check_device(spec.graft.device, f"{spec_where(spec)}: graft.device")
    existing = None
    if probe_storage(storage_url):
        try:
            existing = load_study(storage_url, spec.name)
        except UserError:  # no such study yet
            existing = None
        if existing is not None:
            check_joinable(existing, spec, searched)
    return existing


def _open_study(spec: StudySpec, space: Any, searched: dict[str, Any], storage_url: str | None, *,
                sampler_seed: int | None = None, heartbeat_s: int | None = None,
                grace_s: int | None = None, max_outage_s: float | None = None) -> tuple[Any, Any, bool]:
    """(storage, study, created): the study created with its baselines, or joined.

    ``heartbeat_s``/``grace_s``: the storage heartbeat (default: safesearch.storage's, 60 s / twice that);
    ``max_outage_s``: how long a lost server is waited for (default: safesearch.reconnect's, 600 s)."""
    from safesearch.reconnect import DEFAULT_MAX_OUTAGE_S
    from safesearch.search import ensure_study
    from safesearch.storage import DEFAULT_HEARTBEAT_INTERVAL, open_storage

    storage = open_storage(storage_url, heartbeat_interval=heartbeat_s or DEFAULT_HEARTBEAT_INTERVAL,
                           grace_period=grace_s, max_retry=spec.max_retries,
                           max_outage_s=DEFAULT_MAX_OUTAGE_S if max_outage_s is None else max_outage_s)
    study, created = ensure_study(spec, storage, space, sampler_seed=sampler_seed, searched=searched)
    return storage, study, created


def _describe(spec: StudySpec, space: Any, created: bool, storage: Any, console: Console) -> None:
    from safesearch.storage import mask_url

    n_base = len(space.baseline_params(spec))
    verb = "created" if created else "joined"
    objectives = ", ".join(f"{o.name} ({o.direction})" for o in spec.objectives)
    console.print(
        f"{verb} study [bold]{spec.name}[/] in {escape(mask_url(storage.url))}: {len(space.params)} parameters, "
        f"objectives {objectives}, sampler {spec.sampler.name}, {spec.n_trials} trials"
        + (f" ({n_base} baselines enqueued)" if created else ""),
        soft_wrap=True,
    )


@click.group("study")
def study_group() -> None:
    """Create studies (see also: worker, run, pareto, validate, export)."""


@study_group.command("create")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@storage_option
def create(spec_path: Path, storage_url: str | None) -> None:
    """Create the study of SPEC (or join it if it exists with the same spec), baselines enqueued."""
    console = Console(stderr=True)
    spec = load_study_spec(spec_path)
    space, searched = _plan(spec, _check_inputs(spec, storage_url, serves=False))
    storage, study, created = _open_study(spec, space, searched, storage_url)
    _describe(spec, space, created, storage, console)


def _worker_seed(spec: StudySpec, created: bool) -> int:
    # The creator samples with the spec's seed (a single `run` is reproducible); other workers are
    # seeded apart so that parallel workers do not propose the same points.
    from safesearch.studyspec import MAX_SEED

    return spec.seed if created else (spec.seed + 1 + os.getpid() % 100_000) % (MAX_SEED + 1)


def _trial_line(outcome: Any, n_done: int, n_trials: int) -> str:
    scores = " ".join(f"{k}={v:.3f}" for k, v in outcome.scores.items())
    tag = escape(f" [{outcome.baseline}]") if outcome.baseline else ""
    s = outcome.seconds
    if outcome.stopped:
        return (f"trial {outcome.number} stopped early (first slice: {scores}): {escape(outcome.stopped)}"
                f"  (eval {s['eval']:.1f}s)  study {n_done}/{n_trials}")
    return (f"trial {outcome.number}{tag}: {scores}  (merge {s['merge']:.2f}s, eval {s['eval']:.1f}s)"
            f"  study {n_done}/{n_trials}")


def _open_worker(spec: StudySpec, device: str | None, space: Any, threads: ThreadChoice | None = None,
                 console: Console | None = None) -> Any:
    """The worker's model loaded, torch's threads set to ``threads`` first (None: left as they are) and
    told on ``console``."""
    from safesearch.search import open_worker

    if threads is not None:
        apply_threads(threads)
        (console or Console(stderr=True)).print(threads.describe(), highlight=False, soft_wrap=True)
    _quiet_transformers()
    return open_worker(spec, device=device, space=space)


def _serve(w: Any, spec: StudySpec, space: Any, searched: dict[str, Any], storage_url: str | None,
           artifacts: Path | None, console: Console, **study_kwargs: Any) -> tuple[Any, bool]:
    """Create or join the study once the worker ``w`` is loaded, and give ``w`` its artifact store."""
    from safesearch.storage import artifact_store_for

    storage, study, created = _open_study(spec, space, searched, storage_url, **study_kwargs)
    w.artifact_store = artifact_store_for(storage_url, artifacts)
    _describe(spec, space, created, storage, console)
    return study, created


def _failure_line(f: Any) -> str:
    retry = f"; it runs again as trial {f.retry}" if f.retry is not None else "; its retries are spent"
    return f"trial {f.number} failed: {f.error}{retry}"


def _warn_unretried(study: Any, console: Console) -> None:
    """One warning per failed trial that nobody runs again: a baseline or a point missing from the front."""
    from safesearch.storage import BASELINE_ATTR, unretried_failures

    for t in unretried_failures(study):
        what = f"baseline {t.user_attrs[BASELINE_ATTR]}" if BASELINE_ATTR in t.user_attrs else "its point"
        console.print(escape(f"warning: trial {t.number} failed ({t.user_attrs.get('error', 'no error recorded')}) "
                             f"and is not run again: {what} is missing from the study"), highlight=False,
                      soft_wrap=True)


def _check_heartbeat_options(storage_url: str | None, heartbeat_s: int | None, grace_s: int | None) -> None:
    """Behind a storage proxy the proxy sets every worker's heartbeat (safesearch.proxy): a worker's own
    --heartbeat would disagree with the grace period the proxy judges it by, so it is refused."""
    from safesearch.proxy import is_proxy_url
    from safesearch.storage import resolve_url

    given = [name for name, v in (("--heartbeat", heartbeat_s), ("--heartbeat-grace", grace_s)) if v is not None]
    if given and is_proxy_url(resolve_url(storage_url)):
        raise UserError(f"{given[0]}: with a grpc:// storage the proxy sets the heartbeat of every worker "
                        f"(safesearch storage proxy {given[0]} SECONDS)")


def _complete_count(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


@click.command("worker")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Run at most N trials here (the worker stops anyway once the study has its n_trials).")
@device_option
@artifacts_option
@backend_option
@click.option("--seed", type=int, default=None, help="Sampler seed of this worker (default: spread per worker).")
@click.option("--heartbeat", "heartbeat_s", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="Heartbeat interval of this worker's trials (default: 60).")
@click.option("--heartbeat-grace", "grace_s", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="A trial without a heartbeat for this long is failed and retried (default: twice the interval).")
@click.option("--max-outage", "max_outage_s", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="How long to wait for a storage server that went away before giving up (default: 600).")
@threads_option
@workers_per_machine_option
def worker(spec_path: Path, storage_url: str | None, n_trials: int | None, device: str | None,
           artifacts: Path | None, backend: str | None, seed: int | None, heartbeat_s: int | None,
           grace_s: int | None, max_outage_s: float | None, threads: int | None, workers_per_machine: int) -> None:
    """Join the study of SPEC (creating it if needed) and serve trials until it has its n_trials."""
    console = Console(stderr=True)
    spec = _with_backend(load_study_spec(spec_path), backend)
    chosen = choose_threads(threads, workers_per_machine)
    _check_heartbeat_options(storage_url, heartbeat_s, grace_s)
    space, searched = _plan(spec, _check_inputs(spec, storage_url, artifacts=artifacts, device=device))
    _check_before_loading(spec, storage_url, device, searched)
    w = _open_worker(spec, device, space, chosen, console)
    try:
        study, created = _serve(w, spec, space, searched, storage_url, artifacts, console, sampler_seed=seed,
                                heartbeat_s=heartbeat_s, grace_s=grace_s, max_outage_s=max_outage_s)
        if seed is None and not created:
            study.sampler = _reseeded(spec, _worker_seed(spec, created))
        done = w.work(
            study, spec.n_trials, max_trials=n_trials,
            on_trial=lambda o: console.print(_trial_line(o, _complete_count(study), spec.n_trials), highlight=False,
                                             soft_wrap=True),
            on_failure=lambda f: console.print(escape(_failure_line(f)), highlight=False, soft_wrap=True),
        )
    finally:
        w.close()
    console.print(f"worker done: {done} trials here; the study has {_complete_count(study)}/{spec.n_trials} complete")
    _warn_unretried(study, console)


def _reseeded(spec: StudySpec, seed: int) -> Any:
    from safesearch.search import make_sampler

    return make_sampler(spec, seed)


def _front_table(rs: Sequence[TrialRecord], directions: dict[str, str], title: str, *, all_baselines: bool = True,
                 references: dict[str, dict] | None = None, spec: StudySpec | None = None) -> Table:
    """Front trials (*) and baselines; each score as ``search`` or, once validated, ``search / holdout``;
    a constraint that fails is marked ``!``; the graft's checkpoints (holdout only) at the bottom. With the
    ``spec``, a search score that rests on few items (:data:`safesearch.caveats.FEW_ITEMS`) shows its
    interval and the items beside it."""
    from safesearch.caveats import FEW_ITEMS, items_judged, with_interval

    objectives = {o.name: o for o in spec.objectives} if spec is not None else {}
    fr = front(rs, directions)
    on_front = {r.number for r in fr}
    shown = sorted({*on_front, *(r.number for r in rs if r.baseline and all_baselines)})
    by_number = {r.number: r for r in rs}
    cons = sorted({k for r in rs for k in r.constraint_scores})
    validated = any(r.holdout for r in rs) or bool(references)
    table = Table(title=title, title_justify="left",
                  caption="search / holdout" if validated else None, caption_justify="left")
    for name in ("trial", "", "baseline", *directions, *cons):
        table.add_column(name, justify="right" if name not in ("", "baseline") else "left")

    def cell(search: Any, holdout: Any) -> str:
        return f"{_fmt(search)} / {_fmt(holdout)}" if validated else _fmt(search)

    def objective_cell(r: TrialRecord, name: str, holdout: Any) -> str:
        value = r.scores.get(name)
        o = objectives.get(name)
        n = items_judged(o, r.suites) if o is not None else 0
        if value is None or not 0 < n < FEW_ITEMS:
            return cell(value, holdout)
        shown = with_interval(float(value), n)
        return f"{shown} / {_fmt(holdout)}" if validated else shown

    for number in shown:
        r = by_number[number]
        h = r.holdout or {}
        row = [str(r.number), "*" if number in on_front else "", r.baseline or ""]
        row += [objective_cell(r, n, h.get("scores", {}).get(n)) for n in directions]
        row += [cell(r.constraint_scores.get(c), h.get("constraint_scores", {}).get(c))
                + ("" if r.constraints.get(c, 0) <= 0 else " !") for c in cons]
        table.add_row(*row)
    for name, h in (references or {}).items():
        row = ["", "", escape(f"[{name}]")]
        row += [cell(None, h.get("scores", {}).get(n)) for n in directions]
        row += [cell(None, h.get("constraint_scores", {}).get(c)) for c in cons]
        table.add_row(*row)
    return table


def _directions(spec: StudySpec) -> dict[str, str]:
    return spec.objective_directions


@click.command("run")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@storage_option
@device_option
@artifacts_option
@backend_option
@threads_option
@workers_per_machine_option
def run(spec_path: Path, storage_url: str | None, device: str | None, artifacts: Path | None,
        backend: str | None, threads: int | None, workers_per_machine: int) -> None:
    """Create the study of SPEC and work on it until it has its trials, showing the current front."""
    console = Console(stderr=True)
    spec = _with_backend(load_study_spec(spec_path), backend)
    run_study(spec, storage_url, device, artifacts, console, threads=choose_threads(threads, workers_per_machine))


def run_study(spec: StudySpec, storage_url: str | None, device: str | None, artifacts: Path | None,
              console: Console, threads: ThreadChoice | None = None) -> tuple[StudySpec, Any]:
    """Create (or join) the study and work on it until it has its trials; the front shown as it grows.
    ``threads``: torch's threads, set before the model loads (None: left as they are)."""
    space, searched = _plan(spec, _check_inputs(spec, storage_url, artifacts=artifacts, device=device))
    existing = _check_before_loading(spec, storage_url, device, searched)
    if existing is not None and _complete_count(existing) >= spec.n_trials:
        console.print(f"study {spec.name} already has its {spec.n_trials} trials")
        _warn_unretried(existing, console)
        return spec, existing
    w = _open_worker(spec, device, space, threads, console)
    try:
        study, _ = _serve(w, spec, space, searched, storage_url, artifacts, console)
        directions = _directions(spec)
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console)
        task = progress.add_task(f"study {spec.name}", total=spec.n_trials, completed=_complete_count(study),
                                 last="")

        def view() -> Group:
            rs = records(study)
            return Group(progress, _front_table(rs, directions, "current front", all_baselines=False))

        with Live(view(), console=console, refresh_per_second=4, transient=False) as live:
            def on_trial(o: Any) -> None:
                scores = " ".join(f"{k}={v:.3f}" for k, v in o.scores.items())
                n_done = _complete_count(study)
                what = " stopped early, first slice" if o.stopped else (f" [{o.baseline}]" if o.baseline else "")
                progress.update(task, completed=n_done, last=escape(f"trial {o.number}{what}: {scores}"))
                if not console.is_terminal:  # a log (rich draws nothing live there): a line per trial
                    live.console.print(_trial_line(o, n_done, spec.n_trials), highlight=False, soft_wrap=True)
                live.update(view())

            def on_failure(f: Any) -> None:
                live.console.print(escape(_failure_line(f)), highlight=False, soft_wrap=True)

            w.work(study, spec.n_trials, on_trial=on_trial, on_failure=on_failure)
        if not console.is_terminal:
            console.line()  # off a terminal, Live's last render ends without a newline
    finally:
        w.close()
    rs = records(study)
    console.print(_front_table(rs, directions, f"study {spec.name}: Pareto front (*) and baselines", spec=spec))
    _warn(console, _caveats(spec, rs))
    _warn_unretried(study, console)
    return spec, study


def _caveats(spec: StudySpec, rs: Sequence[TrialRecord]) -> list[str]:
    """What the study's numbers would mislead a reader about (:mod:`safesearch.caveats`), the knee read
    where the picks are made."""
    from safesearch.caveats import study_caveats
    from safesearch.pareto import pick_split

    if not rs:
        return []
    directions = _directions(spec)
    pool, split = pick_split(rs, directions)
    chosen = picks(rs, directions)
    return study_caveats(spec, rs, knee_number=chosen.numbers["knee"], split=split, picked=pool)


def _warn(console: Console, lines: Sequence[str]) -> None:
    for line in lines:
        console.print(escape(f"warning: {line}"), highlight=False, soft_wrap=True)


# -- reading a study -------------------------------------------------------------------------------------


def _load(study_name: str, storage_url: str | None):
    import optuna

    from safesearch.search import stored_spec
    from safesearch.storage import load_study, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # transformers is quieted where a model loads
    storage = open_storage(storage_url, heartbeat_interval=None, create=False)
    study = load_study(storage, study_name)
    return stored_spec(study), study, storage


def _warn_changed_checkpoints(study: Any, spec: StudySpec, console: Console) -> None:
    """A warning per checkpoint file that differs from what the study was created with."""
    from safesearch.search import changed_checkpoint_files

    for name, file in changed_checkpoint_files(study, spec):
        console.print(escape(f"warning: checkpoint {name}: {file} has changed since study {study.study_name!r} "
                             "was created (sha256 differs); what is scored or exported now is not what was searched"),
                      highlight=False, soft_wrap=True)


def _references(study: Any) -> dict[str, dict]:
    from safesearch.search import HOLDOUT_CHECKPOINT

    return {k[len(HOLDOUT_CHECKPOINT):]: v for k, v in study.user_attrs.items() if k.startswith(HOLDOUT_CHECKPOINT)}


def default_plot_path(storage_url: str | None, study_name: str) -> Path:
    from safesearch.storage import is_sqlite, resolve_url, sqlite_path

    url = resolve_url(storage_url)
    db = sqlite_path(url) if is_sqlite(url) else None
    return (db.parent if db is not None else Path("storage")) / "plots" / f"{study_name}-pareto.png"


def _completed(study: Any, study_name: str) -> list[TrialRecord]:
    rs = records(study)
    if not rs:
        raise UserError(f"study {study_name!r}: no completed trial yet")
    return rs


def pareto_report(study_name: str, storage_url: str | None, plot: Path | None) -> dict[str, Any]:
    """The front, the baselines, the references, the plot's path and the failed trials nobody runs
    again, as plain data."""
    from safesearch.outputs import check_output_file
    from safesearch.storage import BASELINE_ATTR, unretried_failures

    spec, study, _ = _load(study_name, storage_url)
    directions = _directions(spec)
    rs = _completed(study, study_name)
    fr = front(rs, directions)
    chosen = picks(rs, directions)
    refs = _references(study)
    plot = plot or default_plot_path(storage_url, study_name)
    check_output_file(plot, "--plot")
    plot_front(rs, directions, plot, f"study {study_name}: {len(rs)} trials", references={
        k: v.get("scores", {}) for k, v in refs.items()})
    return {
        "study": study_name,
        "directions": directions,
        "n_complete": len(rs),
        "front": [r.as_dict() for r in fr],
        "baselines": [r.as_dict() for r in rs if r.baseline],
        "picks": chosen.numbers,
        "picks_split": chosen.split,  # holdout once validate scored the front, else search
        "picks_feasible": chosen.feasible,
        "picks_line": chosen.describe(),
        "references": refs,
        "plot": str(plot),
        "failed_not_retried": [
            {"trial": t.number, "baseline": t.user_attrs.get(BASELINE_ATTR), "error": t.user_attrs.get("error")}
            for t in unretried_failures(study)
        ],
        "stopped_early": _stopped_early(study),
        "caveats": _caveats(spec, rs),
    }


def _stopped_early(study: Any) -> list[dict[str, Any]]:
    """The trials early stopping stopped (PRUNED): not among the n_trials COMPLETE ones, never on the front."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        stop = t.user_attrs.get("early_stop", {})
        out.append({"trial": t.number, "reason": stop.get("reason"), "scores": stop.get("scores", {})})
    return out


@click.command("pareto")
@click.argument("study_name", metavar="STUDY")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print the front, baselines and picks as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where the PNG goes (default: plots/STUDY-pareto.png next to the SQLite file, else storage/plots).")
def pareto(study_name: str, storage_url: str | None, as_json: bool, plot: Path | None) -> None:
    """The Pareto trials of STUDY with their scores beside the baselines, and a PNG of the front."""
    report = pareto_report(study_name, storage_url, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    spec, study, _ = _load(study_name, storage_url)
    console = Console()
    rs = records(study)
    console.print(_front_table(rs, _directions(spec), f"study {study_name}: Pareto front (*) and baselines",
                               references=report["references"], spec=spec))
    console.print(report["picks_line"], highlight=False, soft_wrap=True)
    _warn(Console(stderr=True), report["caveats"])
    if report["stopped_early"]:
        console.print(f"{len(report['stopped_early'])} more trials were stopped early (hopeless after their first "
                      "slice; not on the front)", highlight=False)
    console.print(f"plot: {report['plot']}")
    _warn_unretried(study, Console(stderr=True))


# -- validation ------------------------------------------------------------------------------------------


def validate_study(study_name: str, storage_url: str | None, device: str | None, *, references: bool = True,
                   force: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Re-score the front and the baselines (and the checkpoints the vectors add) on the holdout splits.

    Stored as study user attrs ``holdout.trial.<N>`` / ``holdout.checkpoint.<name>``; ones already there
    are kept unless ``force`` (the scores are a function of the weights and the items)."""
    from safesearch.devices import check_device
    from safesearch.search import (
        HOLDOUT_CHECKPOINT,
        HOLDOUT_ITEMS_ATTR,
        HOLDOUT_TRIAL,
        SEARCH_ITEMS_ATTR,
        check_disjoint,
        check_same_items,
        holdout_refs,
        holdout_scores,
        items_record,
        prepare_tasks,
        search_refs,
    )

    console = console or Console(stderr=True)
    check_device(device, "--device")
    interrupts.import_native()
    from safesearch.backends.transformers import TransformersBackend
    from safesearch.grafted import open_grafted

    spec, study, _ = _load(study_name, storage_url)
    directions = _directions(spec)
    rs = _completed(study, study_name)
    _warn_changed_checkpoints(study, spec, console)
    todo = sorted({r.number for r in front(rs, directions)} | {r.number for r in rs if r.baseline})
    attrs = study.user_attrs
    if not force:
        todo = [n for n in todo if f"{HOLDOUT_TRIAL}{n}" not in attrs]
    # References: the checkpoints the vectors add (aligned, medical), the yardsticks of the front. The
    # anchor's scores are the zero baseline's when there is one (the very same weights).
    zero = next((r.number for r in rs if r.baseline == "zero"), None)
    wanted = list(dict.fromkeys(v.plus for v in spec.graft.vectors.values())) if references else []
    ckpts = [c for c in wanted if force or f"{HOLDOUT_CHECKPOINT}{c}" not in attrs]
    from_zero = [c for c in ckpts if c == spec.graft.anchor and zero is not None]
    ckpts = [c for c in ckpts if c not in from_zero]
    if from_zero and zero not in todo and f"{HOLDOUT_TRIAL}{zero}" not in attrs:
        todo.append(zero)
    _quiet_transformers()
    dev = device or spec.device
    # Before any scoring: the holdout must share no item with what the search scored. The search items
    # are read again and checked against the study's record of them, so that a changed file cannot pass.
    searched = prepare_tasks(search_refs(spec), spec.data_root, judges=False)
    if SEARCH_ITEMS_ATTR in attrs:
        check_same_items(attrs[SEARCH_ITEMS_ATTR], items_record(searched),
                         "validate cannot prove the holdout disjoint from them")
    tasks = prepare_tasks(holdout_refs(spec), spec.data_root, device="cpu" if dev in (None, "auto") else dev)
    for line in check_disjoint(searched, tasks):
        console.print(escape(line), soft_wrap=True)
    study.set_user_attr(HOLDOUT_ITEMS_ATTR, items_record(tasks))
    by_number = {r.number: r for r in rs}
    out: dict[str, Any] = {}
    done = [0]  # items scored so far, of len(todo) + len(ckpts)

    def log(what: str, h: dict[str, Any], seconds: float) -> None:
        """Off a terminal (a log, a batch job), where the bar is not drawn: a line per item scored."""
        done[0] += 1
        if console.is_terminal:
            return
        scores = " ".join(f"{k}={v:.3f}" for k, v in {**h["scores"], **h["constraint_scores"]}.items())
        console.print(f"validate {study_name}: {what} on holdout: {scores}  ({seconds:.0f}s, "
                      f"{done[0]}/{len(todo) + len(ckpts)})", highlight=False, soft_wrap=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task(f"validate {study_name} on holdout", total=len(todo) + len(ckpts))
        if todo:
            grafted = open_grafted(spec.graft, backend=spec.backend, device=dev, options=spec.backend_options)
            try:
                for n in todo:
                    t0 = time.perf_counter()
                    grafted.apply(by_number[n].coefficients)
                    h = holdout_scores(spec, grafted.backend, tasks)
                    study.set_user_attr(f"{HOLDOUT_TRIAL}{n}", h)
                    _note_holdout(study, spec, n, h)
                    out[f"trial {n}"] = h
                    progress.advance(bar)
                    log(f"trial {n}", h, time.perf_counter() - t0)
            finally:
                grafted.close()
        for name in from_zero:
            h = study.user_attrs[f"{HOLDOUT_TRIAL}{zero}"] if f"trial {zero}" not in out else out[f"trial {zero}"]
            study.set_user_attr(f"{HOLDOUT_CHECKPOINT}{name}", h)
            out[f"checkpoint {name}"] = h
        for name in ckpts:
            t0 = time.perf_counter()
            backend = TransformersBackend.from_pretrained(
                spec.graft.checkpoints[name].path, device="cpu" if dev in (None, "auto") else dev)
            h = holdout_scores(spec, backend, tasks)
            study.set_user_attr(f"{HOLDOUT_CHECKPOINT}{name}", h)
            out[f"checkpoint {name}"] = h
            progress.advance(bar)
            log(f"checkpoint {name}", h, time.perf_counter() - t0)
    _note_study_holdout(study, spec)
    return out


def _note_holdout(study: Any, spec: StudySpec, number: int, h: dict[str, Any]) -> None:
    """The trial's note gets its holdout section (optuna-dashboard shows it on the trial's page)."""
    from safesearch.dashboard import (
        HOLDOUT_HEADING,
        save_trial_note,
        scores_section,
        trial_note_of,
        with_holdout,
    )
    from safesearch.search import constraint_bounds

    trial_id = study.get_trials(deepcopy=False)[number]._trial_id
    section = scores_section(HOLDOUT_HEADING, h["scores"], h["constraint_scores"], constraint_bounds(spec, search=False),
                             h["suites"], h["feasible"] if spec.constraints else None)
    save_trial_note(study, trial_id, with_holdout(trial_note_of(study, trial_id), section))


def _note_study_holdout(study: Any, spec: StudySpec) -> None:
    """The study note's holdout table: the front and baselines, search / holdout, and the checkpoints."""
    from safesearch.dashboard import holdout_table, save_study_note, study_note_of, with_study_holdout

    directions = _directions(spec)
    rs = records(study)
    on_front = {r.number for r in front(rs, directions)}
    rows = [(str(r.number), ("* " if r.number in on_front else "") + (r.baseline or ""),
             {"scores": r.scores, "constraint_scores": r.constraint_scores}, r.holdout)
            for r in rs if r.holdout is not None]
    rows += [("", f"[{name}]", {}, h) for name, h in _references(study).items()]
    table = holdout_table(rows, list(directions), [c.name for c in spec.constraints])
    save_study_note(study, with_study_holdout(study_note_of(study), table))


EXTRA_ATTR = "extra."  # study user attr extra.<suite@split>.trial.<N>: a front trial's metrics on an extra suite


@dataclass(frozen=True)
class ExtraSuites:
    """What ``validate --suite`` scores: the suites' tasks, items read and checked (judges built when
    scoring), and the data root their judges resolve against."""

    tasks: dict[str, Any]  # task key -> safesearch.search.Task
    data_root: Path


def plan_extra_suites(spec: StudySpec, names: Sequence[str], suites_dir: Path | None, data_root: Path | None,
                      split: str) -> ExtraSuites:
    """The extra suites' tasks (items read, no judge yet), every input checked before any model loads:
    the names resolve, each suite can form ``split``, its items are read; and where a suite is one the
    search scored, ``split`` shares no item with the search split (else validation would re-score searched
    items)."""
    from safesearch.cli.eval import check_folder_flags
    from safesearch.search import check_disjoint, prepare_tasks, search_refs
    from safesearch.studyspec import SuiteRef
    from safesearch.suites import default_suite_dirs, load_suite

    check_folder_flags(data_root, suites_dir)
    dirs = default_suite_dirs(suites_dir)
    if spec.source is not None:
        dirs.insert(1 if suites_dir is not None else 0, spec.source.resolve().parent)
    refs = []
    for name in dict.fromkeys(names):
        suite = load_suite(name, dirs)
        suite.check_split(split, "--split")
        refs.append(SuiteRef(suite, split, None))
    root = data_root or spec.data_root
    tasks = prepare_tasks(refs, root, judges=False)
    searched = prepare_tasks([r for r in search_refs(spec) if r.name in {x.name for x in refs}], spec.data_root,
                             judges=False)
    if searched:
        check_disjoint(searched, tasks)
    return ExtraSuites(tasks, root)


def score_extra_suites(study_name: str, storage_url: str | None, device: str | None, plan: ExtraSuites,
                       console: Console) -> dict[int, dict[str, dict[str, Any]]]:
    """Score the front and the baselines on the planned extra suites (merged in place, no export); stored
    as study attrs ``extra.<suite@split>.trial.<N>``. Returns trial -> suite key -> metrics."""
    from safesearch.grafted import open_grafted
    from safesearch.search import build_judges, run_tasks

    spec, study, _ = _load(study_name, storage_url)
    rs = _completed(study, study_name)
    numbers = sorted({r.number for r in front(rs, _directions(spec))} | {r.number for r in rs if r.baseline})
    by_number = {r.number: r for r in rs}
    dev = device or spec.device
    tasks = build_judges(plan.tasks, plan.data_root, device="cpu" if dev in (None, "auto") else dev)
    out: dict[int, dict[str, dict[str, Any]]] = {}
    grafted = open_grafted(spec.graft, backend=spec.backend, device=dev, options=spec.backend_options)
    try:
        for i, n in enumerate(numbers):
            t0 = time.perf_counter()
            grafted.apply(by_number[n].coefficients)
            results = run_tasks(grafted.backend, tasks)
            out[n] = {key: dict(r.metrics) for key, r in results.items()}
            for key, metrics in out[n].items():
                study.set_user_attr(f"{EXTRA_ATTR}{key}.trial.{n}", metrics)
            console.print(f"validate {study_name}: trial {n} on {', '.join(out[n])} "
                          f"({time.perf_counter() - t0:.0f}s, {i + 1}/{len(numbers)})", highlight=False, soft_wrap=True)
    finally:
        grafted.close()
    return out


def _extra_table(spec: StudySpec, rs: Sequence[TrialRecord], scored: dict[int, dict[str, dict[str, Any]]],
                 plan: ExtraSuites, title: str) -> Table:
    """A row per trial scored (front *, baselines), a column per extra suite: its metric on n items."""
    on_front = {r.number for r in front(rs, _directions(spec))}
    by_number = {r.number: r for r in rs}
    table = Table(title=title, title_justify="left")
    for name in ("trial", "", "baseline"):
        table.add_column(name, justify="right" if name == "trial" else "left")
    for t in plan.tasks.values():
        table.add_column(f"{t.suite.name} ({t.suite.dataset.split}) {t.suite.metric}", justify="right")
    for n, metrics in sorted(scored.items()):
        row = [str(n), "*" if n in on_front else "", by_number[n].baseline or ""]
        for key, t in plan.tasks.items():
            m = metrics.get(key, {})
            value = m.get(t.suite.metric)
            row.append(f"{_fmt(value)} (n {m.get('n', 0)})" if value is not None else "-")
        table.add_row(*row)
    return table


@click.command("validate")
@click.argument("study_name", metavar="STUDY")
@storage_option
@device_option
@click.option("--no-references", is_flag=True, help="Skip scoring the checkpoints the vectors add (aligned, medical).")
@click.option("--force", is_flag=True, help="Re-score trials already validated.")
@click.option("--suite", "suites", multiple=True, metavar="NAME",
              help="Also score the front and baselines on this suite (name or YAML path; repeatable), no export.")
@click.option("--split", default="holdout", show_default=True,
              help="The split of the --suite suites to score (a suite the search scored must not share items).")
@click.option("--suites-dir", type=click.Path(path_type=Path), default=None,
              help="Look --suite names up here first (then the spec's folder, ./objectives, the installed suites).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Base of the --suite suites' relative dataset paths [default: the study's data root].")
def validate(study_name: str, storage_url: str | None, device: str | None, no_references: bool, force: bool,
             suites: tuple[str, ...], split: str, suites_dir: Path | None, data_root: Path | None) -> None:
    """Re-score the Pareto trials and the baselines of STUDY on the holdout splits; stored in the study."""
    console = Console(stderr=True)
    plan = None
    if suites:  # every --suite input checked before any scoring
        spec, _, _ = _load(study_name, storage_url)
        plan = plan_extra_suites(spec, suites, suites_dir, data_root, split)
    done = validate_study(study_name, storage_url, device, references=not no_references, force=force,
                          console=console)
    spec, study, _ = _load(study_name, storage_url)
    console.print(f"validated {len(done)} (trials and checkpoints) on holdout")
    rs = records(study)
    Console().print(_front_table(rs, _directions(spec), f"study {study_name}: search and holdout",
                                 references=_references(study), spec=spec))
    Console().print(picks(rs, _directions(spec)).describe(), highlight=False, soft_wrap=True)
    _warn(console, _caveats(spec, rs))
    if plan is not None:
        scored = score_extra_suites(study_name, storage_url, device, plan, console)
        Console().print(_extra_table(spec, rs, scored, plan, f"study {study_name}: extra suites"))


# -- export ----------------------------------------------------------------------------------------------


def export_trial(study_name: str, storage_url: str | None, out: Path, *, trial: int | None = None,
                 pick_how: str | None = None, device: str | None = None, overwrite: bool = False) -> tuple[Path, int]:
    """Export a completed trial's merge as a checkpoint; its ``safesearch.json`` names the study and trial
    and carries the search (and holdout) scores."""
    from optuna.trial import TrialState

    from safesearch.devices import check_device
    from safesearch.outputs import check_output_dir
    from safesearch.search import FINGERPRINT_ATTR, HOLDOUT_ITEMS_ATTR, SEARCH_ITEMS_ATTR
    from safesearch.storage import artifact_root, mask_url, sqlite_path

    if (trial is None) == (pick_how is None):
        raise UserError("export: give either --trial N or --pick " + "|".join(PICKS))
    check_device(device, "--device")
    interrupts.import_native()
    from safesearch.digests import spec_digests
    from safesearch.export import export_merged
    from safesearch.streaming import StreamingMerger

    _quiet_transformers()
    spec, study, storage = _load(study_name, storage_url)
    db = sqlite_path(storage.url)
    check_output_dir(out, "--out", overwrite=overwrite,
                     checkpoints=[(c.name, c.path) for c in spec.graft.checkpoints.values()],
                     inputs=[("the study database", db)] * (db is not None)
                     + [("the artifact store", artifact_root(storage.url))])
    directions = _directions(spec)
    pick_split = None
    if pick_how is not None:
        completed = _completed(study, study_name)  # read once: the picks and the caveats
        chosen = picks(completed, directions)
        number, pick_split = chosen.numbers[pick_how], chosen.split
        Console(stderr=True).print(f"--pick {pick_how}: trial {number}, picked {chosen.where}"
                                   + ("" if chosen.feasible else "; no trial meets the constraints there"),
                                   highlight=False, soft_wrap=True)
        _warn(Console(stderr=True), _caveats(spec, completed))
    else:
        all_trials = study.get_trials(deepcopy=False)
        if not 0 <= trial < len(all_trials):  # type: ignore[operator]
            span = f"trials 0-{len(all_trials) - 1}" if all_trials else "no trials"
            raise UserError(f"--trial {trial}: study {study_name!r} has no such trial ({span})")
        number = trial  # type: ignore[assignment]
    frozen = study.get_trials(deepcopy=False)[number]
    if frozen.state != TrialState.COMPLETE:
        raise UserError(f"--trial {number}: trial {number} of study {study_name!r} is {frozen.state.name}, "
                        "not COMPLETE; only completed trials export")
    record = next(r for r in records(study) if r.number == number)
    _warn_changed_checkpoints(study, spec, Console(stderr=True))
    digests = spec_digests(spec.graft)  # the provenance hashes, on another core while the merge streams
    # Merged once, streamed from the checkpoints with the study's kernel: the bytes the study merged.
    merger = StreamingMerger.from_spec(spec.graft, device=device or "cpu",
                                       kernel=spec.backend_options.get("kernel", "eager"))
    coefs = merger.parse(record.coefficients, where=f"trial {number}'s coefficients")
    merger.check_bounds(coefs, where=f"trial {number}'s coefficients")
    provenance = {
        "study": {
            "name": study_name,
            "storage": mask_url(storage.url),
            "trial": number,
            "pick": pick_how,
            "pick_split": pick_split,  # holdout: picked among the validated trials on their holdout scores
            "baseline": record.baseline,
            "fingerprint": study.user_attrs.get(FINGERPRINT_ATTR),
            "directions": directions,
            "params": dict(frozen.params),
            "search_scores": record.scores,
            "constraint_scores": record.constraint_scores,
            "feasible": record.feasible,
            "suites": record.suites,
            "holdout": record.holdout,
            # What each split scored: n and a digest of the item ids per suite (validate proved them disjoint).
            "items": {"search": study.user_attrs.get(SEARCH_ITEMS_ATTR),
                      "holdout": study.user_attrs.get(HOLDOUT_ITEMS_ATTR)},
        }
    }
    path = export_merged(merger, coefs, out, overwrite=overwrite, extra_provenance=provenance, digests=digests)
    return path, number


@click.command("export")
@click.argument("study_name", metavar="STUDY")
@click.option("--trial", type=int, default=None, help="The trial number to export.")
@click.option("--pick", "pick_how", type=click.Choice(PICKS), default=None, help="Pick a trial of the front.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The checkpoint directory to write.")
@storage_option
@device_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(study_name: str, trial: int | None, pick_how: str | None, out: Path, storage_url: str | None,
           device: str | None, overwrite: bool) -> None:
    """Export a trial of STUDY (by number or picked from the front) as a Hugging Face checkpoint."""
    t0 = time.perf_counter()
    path, number = export_trial(study_name, storage_url, out, trial=trial, pick_how=pick_how, device=device,
                                overwrite=overwrite)
    print(f"exported trial {number} of study {study_name} to {path} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    from safesearch.outputs import left_out_note

    note = left_out_note(path)
    if note:
        print(note, file=sys.stderr)
