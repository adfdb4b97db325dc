"""``safesearch demo``: the main job on the embedded default (the toy world in ``storage/``)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from safesearch.cli.toyworld import build_and_report

DEFAULT_STORAGE = Path("storage")


@click.command("demo")
@click.option("--storage", type=click.Path(path_type=Path), default=DEFAULT_STORAGE, show_default=True,
              help="Where the toy world and the local store live.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(storage: Path, seed: int) -> None:
    """Build the toy world (or reuse it) and print its quick check."""
    build_and_report(storage / "toyworld", seed, "full", Console())
