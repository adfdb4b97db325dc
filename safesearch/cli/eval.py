"""``safesearch eval MODEL --suite NAME ...``: benchmark a checkpoint on disk, suite by suite.

Prints a table per dimension (safety, over-refusal, medical) and, with ``--json``, writes a report with
every suite's metrics and per-item outcomes (id, response, verdict or chosen option).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safesearch import interrupts
from safesearch.devices import check_device
from safesearch.errors import UserError
from safesearch.evaluate import (
    SuiteResult,
    attack_notes,
    build_judge,
    evaluate,
    image_cache_dir,
    images_why,
    load_items,
    shows_images,
    work_units,
)
from safesearch.judges import Judge
from safesearch.outputs import check_output_file
from safesearch.studyspec import BACKENDS
from safesearch.suites import JudgeSpec, Suite, default_data_root, default_suite_dirs, load_suite

# Columns shown per dimension, in order; the JSON report has every metric.
SHOWN = {
    "safety": ("safety", "asr", "n", "n_unjudged"),
    "over-refusal": ("over_refusal", "n", "n_unjudged"),
    "medical": ("acc", "acc_norm", "n", "n_unparsed"),
}


def _fmt(value: float | int | None) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_tables(results: list[SuiteResult], splits: dict[str, str] | None = None) -> list[Table]:
    """A table per dimension; ``splits`` (suite -> the split scored) adds a split column."""
    tables = []
    for dimension, columns in SHOWN.items():
        rows = [r for r in results if r.dimension == dimension]
        if not rows:
            continue
        shown = [c for c in columns if any(c in r.metrics for r in rows)]
        table = Table(title=dimension, title_justify="left")
        table.add_column("suite")
        if splits:
            table.add_column("split")
        table.add_column("metric")
        for c in shown:
            table.add_column(c, justify="right")
        for r in rows:
            split = [splits.get(r.suite, "")] if splits else []
            table.add_row(r.suite, *split, r.metric, *(_fmt(r.metrics.get(c)) for c in shown))
        tables.append(table)
    return tables


# The options that say where suites and their data are found (eval, suites).
data_root_option = click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    help="Base of relative dataset paths [default: $SAFESEARCH_DATA_ROOT or .]",
)
suites_dir_option = click.option(
    "--suites-dir",
    type=click.Path(path_type=Path),
    help="Look suite names up here first (then ./objectives, then the installed example suites).",
)


def check_folder_flags(data_root: Path | None, suites_dir: Path | None) -> None:
    """``--data-root`` and ``--suites-dir``, when given, are folders that exist."""
    for flag, folder in (("--data-root", data_root), ("--suites-dir", suites_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{flag} {folder}: {'is not a directory' if folder.exists() else 'does not exist'}")


def _split_label(suite: Suite, split: str | None) -> str:
    """The split a suite was scored on, as a report says it ("all" for every item)."""
    name = suite.dataset.split if split is None else split
    return name or "all"


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--suite",
    "suites",
    multiple=True,
    required=True,
    help="Suite name (objectives/NAME.yaml) or YAML path; repeatable.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Score at most N items per suite (a seeded subset of the suite's).",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="transformers", show_default=True)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    help="Write the report (metrics and per-item outcomes) here.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="transformers' device (vLLM uses its platform's).")
@click.option(
    "--vllm-option",
    "vllm_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A vllm.LLM engine argument for --backend vllm (YAML value), e.g. max_model_len=4096; repeatable.",
)
@click.option("--seed", type=int, help="Override the suites' subset seed.")
@click.option(
    "--split",
    help="Score this split of every suite (search, holdout, or a published split such as test) "
    "[default: each suite's dataset.split; every item of a partitioned suite without one].",
)
@data_root_option
@suites_dir_option
def eval_cmd(
    model: Path,
    suites: tuple[str, ...],
    limit: int | None,
    backend: str,
    json_out: Path | None,
    batch_size: int,
    device: str,
    vllm_options: tuple[str, ...],
    seed: int | None,
    split: str | None,
    data_root: Path | None,
    suites_dir: Path | None,
) -> None:
    """Evaluate MODEL (a checkpoint directory) on one or more suites."""
    # Everything that can be wrong with the input is checked before the model loads.
    check_folder_flags(data_root, suites_dir)
    if any(not name.strip() for name in suites):
        raise UserError("--suite: an empty suite name (give a name from objectives/ or a YAML path)")
    if backend == "vllm":
        interrupts.import_native()
        from safesearch.backends.vllm import parse_options

        engine_options = parse_options(vllm_options, "--vllm-option")
    elif vllm_options:
        raise UserError("--vllm-option: engine options apply to --backend vllm only")
    else:
        check_device(device, "--device")
    root = data_root or default_data_root()
    dirs = default_suite_dirs(suites_dir)
    loaded = [load_suite(name, dirs) for name in suites]
    if split is not None:
        if not split.strip():
            raise UserError("--split: an empty split name (e.g. search, holdout, test)")
        for s in loaded:
            s.check_split(split, "--split")
    items = {s.name: load_items(s, root, split=split, limit=limit, seed=seed) for s in loaded}
    if json_out is not None:
        check_output_file(json_out, "--json")
    interrupts.import_native()  # the input was checked without torch; the model needs it
    from transformers.utils import logging as hf_logging

    from safesearch.backends.transformers import TransformersBackend
    from safesearch.checkpoint import check_model

    check_model(model)
    if not TransformersBackend.takes_images(model):
        for s in loaded:
            if shows_images(s, items[s.name]):
                raise UserError(f"suite '{s.name}' shows images, but the model at '{model}' takes text only"
                                f"{images_why(s)}")
    # Our own progress bar says what runs; transformers' weight-loading bars would only clutter stderr.
    hf_logging.disable_progress_bar()
    if backend == "vllm":
        from safesearch.backends.vllm import VLLMBackend

        model_backend = VLLMBackend.from_pretrained(model, **engine_options)
    else:
        model_backend = TransformersBackend.from_pretrained(model, device=device, batch_size=batch_size)
    judges: dict[JudgeSpec, Judge] = {}
    results: list[SuiteResult] = []
    err = Console(stderr=True)
    for s in loaded:
        for note in attack_notes(s, items[s.name]):
            err.print(f"note: {note}", soft_wrap=True, markup=False)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        for suite in loaded:
            judge = None
            if suite.uses_judge:
                if suite.judge not in judges:
                    judges[suite.judge] = build_judge(suite.judge, data_root=root, device=device)
                judge = judges[suite.judge]
            task = bar.add_task(suite.name, total=work_units(suite, items[suite.name]))
            results.append(
                evaluate(
                    model_backend,
                    suite,
                    items[suite.name],
                    judge=judge,
                    image_cache=image_cache_dir(root),
                    progress=lambda n, task=task: bar.advance(task, n),
                )
            )
    if backend == "vllm":
        model_backend.close()  # the engine runs in this process: free it before the report
    out = Console()
    for table in render_tables(results, {s.name: _split_label(s, split) for s in loaded}):
        out.print(table)
    unjudged = sum(int(r.metrics.get("n_unjudged") or 0) for r in results)
    if unjudged:
        err.print(f"warning: {unjudged} item(s) unjudged (left out of the rates, never counted as safe)")
    if json_out is not None:
        report = {
            "model": str(model),
            "backend": backend,
            "seed": seed,
            "limit": limit,
            "split": split,
            "suites": [
                {**r.as_dict(), "split": _split_label(s, split), "split_rule": s.splits.describe()}
                for s, r in zip(loaded, results, strict=True)
            ],
        }
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
