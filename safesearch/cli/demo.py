"""``safesearch demo``: the whole job on the embedded default, start to finish.

1. the toy world in ``<storage>/toyworld`` (built, or reused when complete);
2. ``studies/toy.yaml`` on SQLite at ``<storage>/safesearch.db`` (its checkpoints and data pointed at that
   world), worked until it has its trials, the front shown as it grows;
3. the front beside the baselines, and its plot;
4. validation: the front, the baselines and the graft's checkpoints re-scored on the holdout split;
5. the knee trial exported to ``<storage>/exports/<study>-trial-<N>``;
6. what to open next: the dashboard, the plot, the export.

Every step reuses what an earlier run left (complete checkpoints, trials, holdout scores, the export).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.panel import Panel

from safesearch.cli.toyworld import build_and_report, build_image_and_report
from safesearch.errors import UserError
from safesearch.studyspec import StudySpec, study_spec_from_dict
from safesearch.suites import packaged_suites_dir
from safesearch.textfiles import read_yaml

DEFAULT_STORAGE = Path("storage")
_REPO = Path(__file__).resolve().parents[2]
# The project's own toy study and suites, never a file of the same name in the working directory.
TOY_STUDY = _REPO / "studies" / "toy.yaml"
# modality -> (the world's folder under --storage, its study)
WORLDS = {"text": ("toyworld", TOY_STUDY), "image-text": ("toyworld-image", _REPO / "studies" / "toy-image.yaml")}


def toy_study_path(modality: str = "text") -> Path:
    """The project's ``studies/toy.yaml`` (``toy-image.yaml`` for the image-text world), of the source tree
    the package runs from."""
    path = WORLDS[modality][1]
    if not path.is_file():
        raise UserError(f"{path}: not found (the demo runs from the project's source tree)")
    return path


def demo_spec(storage: Path, seed: int, template: Path | None = None, modality: str = "text") -> StudySpec:
    """The toy study, its checkpoints and data those of the world in ``storage/toyworld`` (image-text:
    ``storage/toyworld-image``), seeded ``seed``."""
    from safesearch.graftspec import load_spec, spec_from_dict

    template = template or toy_study_path(modality)
    data: dict[str, Any] = read_yaml(template, "study spec")
    graft = data["graft"]
    graft_spec = (
        load_spec(template.parent / graft) if isinstance(graft, str) else spec_from_dict(graft, template.parent)
    )
    graft_dict = graft_spec.to_dict()
    world = (storage / WORLDS[modality][0]).resolve()
    for name, ckpt in graft_dict["checkpoints"].items():
        ckpt["path"] = str(world / name)
    base = data.get("name", template.stem)
    # The toy suites' paths (data/{split}/...) are relative to the toy world: it is the data root.
    data.update(graft=graft_dict, data_root=str(world), seed=seed,
                name=base if seed == 0 else f"{base}-seed{seed}")
    return study_spec_from_dict(data, base_dir=template.parent, where=str(template), suite_dirs=[packaged_suites_dir()])


@click.command("demo")
@click.option("--storage", type=click.Path(path_type=Path), default=DEFAULT_STORAGE, show_default=True,
              help="Where the toy world, the study database, the artifacts and the export live.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the toy world and of the sampler.")
@click.option("--modality", type=click.Choice(tuple(WORLDS)), default="text", show_default=True,
              help="image-text: the image-text toy world (a tiny LLaVA aligned on text only) and its study, "
                   "safety on FigStep images beside safety on text (studies/toy-image.yaml).")
def demo(storage: Path, seed: int, modality: str) -> None:
    """The whole demo: toy world, the toy study on SQLite, its front, validation, export of the knee."""
    from safesearch.cli.study import (
        _directions,
        _front_table,
        export_trial,
        pareto_report,
        run_study,
        validate_study,
    )
    from safesearch.pareto import records
    from safesearch.storage import load_study

    console = Console()
    t0 = time.perf_counter()
    console.rule("1. the toy world")
    world = storage / WORLDS[modality][0]
    if modality == "image-text":
        build_image_and_report(world, seed, "full", console)
    else:
        build_and_report(world, seed, "full", console)

    console.rule("2. the study")
    spec = demo_spec(storage, seed, modality=modality)
    db = storage / "safesearch.db"
    url = f"sqlite:///{db}"
    run_study(spec, url, None, None, console)

    console.rule("3. validation on the holdout split")
    validate_study(spec.name, url, None, console=console)

    console.rule("4. the front")
    report = pareto_report(spec.name, url, None)
    study = load_study(url, spec.name)
    console.print(_front_table(records(study), _directions(spec), f"study {spec.name}: Pareto front (*) and baselines",
                               references=report["references"]))
    console.print(report["picks_line"], highlight=False, soft_wrap=True)

    console.rule("5. export of the knee trial")
    knee = report["picks"]["knee"]
    out = storage / "exports" / f"{spec.name}-trial-{knee}"
    if out.exists():
        console.print(f"{out} is there already (trial {knee}); kept")
    else:
        export_trial(spec.name, url, out, trial=knee)
        console.print(f"exported trial {knee} to {out}")

    minutes = (time.perf_counter() - t0) / 60
    console.print(Panel.fit(
        "\n".join([
            f"[bold]open next[/]  (demo took {minutes:.1f} min)",
            f"  dashboard:  safesearch dashboard --storage {url}   (then http://127.0.0.1:8080/dashboard)",
            f"  the front:  safesearch pareto {spec.name} --storage {url}",
            f"  its plot:   {report['plot']}",
            f"  the model:  {out}  (safesearch.json: study, trial, search and holdout scores)",
            f"  score it:   safesearch eval {out} --suite toy-harmful-general "
            f"{'--suite toy-harmful-general-figstep ' if modality == 'image-text' else ''}--suite toy-mcq-medical "
            f"--data-root {spec.data_root}",
        ]),
        title="safesearch demo", border_style="green",
    ))
