"""``safesearch suites [NAME...]``: what each suite scores, before any model is loaded.

One row per suite: its format, metric and attack, its split rule, and the items each split holds in the
data found under the data root (or where the data was looked for). This is how a user sees that a
benchmark file without a split of its own is partitioned, and how many items the search and the holdout
will score.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from safesearch.cli.eval import check_folder_flags, data_root_option, suites_dir_option
from safesearch.errors import UserError
from safesearch.suites import Suite, default_data_root, default_suite_dirs, load_suite

SPLITS = ("search", "holdout")


def split_counts(suite: Suite, data_root: Path) -> dict[str, int | str]:
    """Items per split (and for the suite's default), or why they could not be read."""
    from safesearch.evaluate import load_items

    counts: dict[str, int | str] = {}
    for split in (*SPLITS, suite.dataset.split or ""):
        label = split or "all"
        if label in counts:
            continue
        try:
            counts[label] = len(load_items(suite, data_root, split=split))
        except UserError as e:
            counts[label] = e.message
    return counts


@click.command("suites")
@click.argument("names", nargs=-1)
@data_root_option
@suites_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per suite) instead of a table.")
def suites_cmd(names: tuple[str, ...], data_root: Path | None, suites_dir: Path | None, as_json: bool) -> None:
    """List suites (default: every one found) with their split rule and items per split."""
    check_folder_flags(data_root, suites_dir)
    dirs = default_suite_dirs(suites_dir)
    if not names:
        names = tuple(sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")}))
    loaded = [load_suite(name, dirs) for name in names]
    root = data_root or default_data_root()
    if as_json:
        rows = []
        for suite in loaded:
            counts = split_counts(suite, root)
            rows.append({
                "suite": suite.name, "source": str(suite.source), "format": suite.dataset.format,
                "metric": suite.metric, "attack": suite.attack, "split_rule": suite.splits.describe(),
                "default_split": suite.dataset.split or "all",
                "items": {k: v for k, v in counts.items() if isinstance(v, int)},
                "problems": {k: v for k, v in counts.items() if isinstance(v, str)},
            })
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"suites (data root {root}); search/holdout: items per split", title_justify="left")
    for column in ("suite", "attack", "split rule", "search", "holdout", "eval default"):
        table.add_column(column, justify="right" if column in (*SPLITS, "eval default") else "left",
                         no_wrap=column in ("suite", "split rule"))
    problems = {}
    for suite in loaded:
        counts = split_counts(suite, root)
        default = suite.dataset.split or "all"
        shown = []
        for label in (*SPLITS, default):
            value = counts[label]
            if isinstance(value, str):
                problems.setdefault(suite.name, value)  # the first reason is the one to fix
                value = "-"
            shown.append(str(value))
        table.add_row(suite.name, suite.attack, suite.splits.short(), shown[0], shown[1], f"{shown[2]} {default}")
    Console().print(table)
    err = Console(stderr=True, soft_wrap=True)
    for name, why in problems.items():
        err.print(f"note: {name}: {why}", markup=False)
