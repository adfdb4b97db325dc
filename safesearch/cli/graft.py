"""``safesearch groups SPEC`` and ``safesearch merge SPEC --coef COEF.json --out DIR``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from safesearch import interrupts
from safesearch.devices import check_device
from safesearch.digests import spec_digests
from safesearch.graftspec import load_graft, load_spec
from safesearch.grouping import group_parameters
from safesearch.outputs import check_output_dir


@click.command("groups")
@click.argument("spec", type=click.Path(path_type=Path))
def groups(spec: Path) -> None:
    """Print the module groups of SPEC's anchor with their parameter counts (reads headers only).
    SPEC is a graft spec or a study spec (its graft)."""
    s = load_graft(spec)
    interrupts.import_native()
    from safesearch.vectors import open_sources

    sources = open_sources(s)
    layout = sources.anchor.layout
    grouping = group_parameters(layout.parameters, s.groups)
    covered = {v: {n for n in sources.mapped[s.vectors[v].plus] if n in layout.parameters} for v in s.vectors}

    table = Table(title=f"{spec}: anchor {s.anchor} ({layout.architecture}), preset {s.groups.preset}")
    table.add_column("group")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("vectors")
    total = 0
    for g, names in grouping.groups.items():
        count = sum(_numel(layout.parameters[n]) for n in names)
        total += count
        touching = [v for v in s.vectors if any(n in covered[v] for n in names)]
        table.add_row(g, str(len(names)), f"{count:,}", ", ".join(touching) or "-")
    frozen = sum(_numel(layout.parameters[n]) for n in grouping.frozen)
    table.add_row("(frozen)", str(len(grouping.frozen)), f"{frozen:,}", "-", end_section=True)
    table.add_row("total", str(len(layout.parameters)), f"{total + frozen:,}", "")
    Console(width=200).print(table)


@click.command("merge")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--coef", "coef_path", required=True, type=click.Path(path_type=Path),
              help="JSON {vector: {group: coefficient}}; a '*' group sets a vector's other groups; unset means 0.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write the merged checkpoint to.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--device", default=None, help="Override the spec's device (cpu, cuda, cuda:N).")
def merge(spec: Path, coef_path: Path, out: Path, overwrite: bool, device: str | None) -> None:
    """Merge SPEC's vectors onto its anchor with COEF and export a Hugging Face checkpoint to OUT."""
    s = load_spec(spec)
    check_device(device, "--device")
    check_device(s.device, f"{spec}: device")
    check_output_dir(out, "--out", overwrite=overwrite,
                     checkpoints=[(c.name, c.path) for c in s.checkpoints.values()],
                     inputs=[("the spec's folder", spec.parent), ("the coefficient file", coef_path)])
    # The provenance hashes of the inputs need no torch: they run on the other core while torch imports.
    digests = spec_digests(s)
    interrupts.import_native()
    from safesearch.export import export_merged
    from safesearch.merging import load_coefficients
    from safesearch.streaming import StreamingMerger
    from safesearch.vectors import open_sources

    sources = open_sources(s)
    grouping = group_parameters(sources.anchor.layout.parameters, s.groups)
    coefs = load_coefficients(coef_path, {v: list(grouping.groups) for v in s.vectors})
    # One merge: streamed from the checkpoints, nothing resident (same bytes as the resident merger's).
    merger = StreamingMerger.from_spec(s, device=device, sources=sources)
    merger.check_bounds(coefs, where=f"coefficient file {coef_path}")
    export_merged(merger, coefs, out, overwrite=overwrite, digests=digests)
    click.echo(f"wrote {out} ({len(merger.names)} merged tensors, {merger.dtype}, anchor {s.anchor})")
    from safesearch.outputs import left_out_note

    note = left_out_note(out)
    if note:
        click.echo(note, err=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
