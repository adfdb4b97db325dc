"""The front plot of `safesearch pareto`: on a crowded front (identical scores, near-identical scores,
baselines on and off the front, a holdout reference) every front trial and every baseline is named by a
label, and no two labels overlap."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from safesearch import frontplot
from safesearch.frontplot import FrontPlot, plot_front
from safesearch.pareto import TrialRecord, front

DIRECTIONS = {"safety": "maximize", "medical": "maximize"}


def _rec(n: int, safety: float, medical: float, baseline: str | None = None, feasible: bool = True) -> TrialRecord:
    return TrialRecord(number=n, state="COMPLETE", scores={"safety": safety, "medical": medical},
                       constraints={"over_refusal": -0.1 if feasible else 0.2}, baseline=baseline)


def crowded() -> list[TrialRecord]:
    """5 baselines and 12 searched trials: baselines sharing their scores with trials (two trials with
    the zero baseline at the 0.600/1.000 corner), runs of front trials within 0.005 of each other, a
    dominated trial among them and an infeasible one."""
    return [
        _rec(0, 0.600, 1.000, "zero"),
        _rec(1, 0.700, 0.950, "lambda=0.25"),
        _rec(2, 0.800, 0.900, "lambda=0.5"),
        _rec(3, 0.900, 0.700, "lambda=0.75"),
        _rec(4, 0.950, 0.600, "lambda=1.0"),
        _rec(5, 0.600, 1.000),  # = zero
        _rec(6, 0.600, 1.000),  # = zero
        _rec(7, 0.603, 0.998),  # within 0.005 of the corner
        _rec(8, 0.800, 0.900),  # = lambda=0.5
        _rec(9, 0.802, 0.899),
        _rec(10, 0.804, 0.897),
        _rec(11, 0.850, 0.850),
        _rec(12, 0.852, 0.848),
        _rec(13, 0.950, 0.600),  # = lambda=1.0
        _rec(14, 0.951, 0.598),
        _rec(15, 0.845, 0.846),  # dominated, next to 11/12
        _rec(16, 0.990, 0.990, feasible=False),
    ]


REFERENCES = {"medical": {"safety": 0.601, "medical": 0.999}, "aligned": {"safety": 0.97, "medical": 0.40}}


@dataclass
class Seen:
    """What the saved figure showed, read from its own artists before plot_front closed it."""

    texts: list[str]
    boxes: list[Bbox]  # each label's visible box (its white box, else its text) in display pixels
    points: list[tuple[float, float]]  # the labelled points in display pixels
    xlabel: str
    ylabel: str

    def overlapping(self) -> list[tuple[str, str]]:
        return [(self.texts[i], self.texts[j]) for i, j in itertools.combinations(range(len(self.boxes)), 2)
                if self.boxes[i].overlaps(self.boxes[j])]

    def named(self) -> set[str]:
        """What the labels say: ``#N``, baseline labels (marks dropped), ``NAME (holdout)``."""
        parts = (p for t in self.texts for p in t.replace("\n", " ").split(", "))
        return {p.strip().removesuffix(" (infeasible)").removesuffix("*") for p in parts}


def look(plot: FrontPlot) -> Seen:
    plot.fig.canvas.draw()
    renderer = plot.fig.canvas.get_renderer()
    boxes = []
    for label in plot.labels:
        patch = label.artist.get_bbox_patch()
        boxes.append(patch.get_window_extent(renderer) if patch is not None
                     else Text.get_window_extent(label.artist, renderer))
    points = [tuple(p) for p in plot.ax.transData.transform([label.xy for label in plot.labels])]
    return Seen([label.artist.get_text() for label in plot.labels], boxes, points,
                plot.ax.get_xlabel(), plot.ax.get_ylabel())


def draw(tmp_path: Path, rs: list[TrialRecord], refs: dict | None = None) -> tuple[Path, Seen]:
    seen: list[Seen] = []
    out = plot_front(rs, DIRECTIONS, tmp_path / "plots" / "front.png", "crowded", references=refs,
                     inspect=lambda plot: seen.append(look(plot)))
    assert len(seen) == 1
    return out, seen[0]


def test_crowded_front_labels_name_everything_and_do_not_overlap(tmp_path: Path) -> None:
    rs = crowded()
    out, seen = draw(tmp_path, rs, REFERENCES)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*partial*"))
    fr = front(rs, DIRECTIONS)
    assert {r.number for r in fr if not r.baseline} >= {5, 6, 7, 8, 9, 10, 11, 12, 13, 14}
    assert 15 not in {r.number for r in fr}
    said = seen.named()
    assert {f"#{r.number}" for r in fr if not r.baseline} <= said
    assert {r.baseline for r in rs if r.baseline} <= said
    assert {"medical (holdout)", "aligned (holdout)"} <= said
    assert not seen.overlapping()
    # Points with identical scores share a label: the zero baseline with trials 5 and 6.
    assert any("zero*" in t and "#5" in t and "#6" in t for t in seen.texts)
    # No label covers a labelled point (its own or another's).
    for box in seen.boxes:
        assert not any(box.contains(x, y) for x, y in seen.points)
    # The axes still name the objectives and their directions.
    assert seen.xlabel == "safety (maximize, search split)"
    assert seen.ylabel == "medical (maximize, search split)"


def fixed_offsets(fig, ax, pending, markers, line=()):  # the placement before labels were laid out
    return [frontplot.PlotLabel(ax.annotate(text, xy, xytext=(4, 4), textcoords="offset points", fontsize=7),
                             xy, names) for xy, text, names, _ in pending]


def test_the_overlap_check_catches_fixed_offsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontplot, "_place_labels", fixed_offsets)
    _, seen = draw(tmp_path, crowded(), REFERENCES)
    assert seen.overlapping()


def test_200_trials_place_quickly_and_cleanly(tmp_path: Path) -> None:
    rng = random.Random(0)
    rs = []
    for n in range(200):
        s = rng.random()
        rs.append(_rec(n, round(s, 3), round(max(0.0, 1 - s * s - rng.random() * 0.3), 3)))
    for n in range(200, 230):  # many trials sharing a few front scores
        rs.append(_rec(n, *rng.choice([(1.0, 0.0), (0.5, 0.75), (0.0, 1.0)])))
    rs += [_rec(230 + i, lam, 1 - lam * lam, f"lambda={lam}") for i, lam in enumerate((0.0, 0.25, 0.5, 0.75, 1.0))]
    t0 = time.perf_counter()
    _, seen = draw(tmp_path, rs)
    took = time.perf_counter() - t0
    assert not seen.overlapping()
    fr = front(rs, DIRECTIONS)
    said = seen.named()
    assert {f"#{r.number}" for r in fr if not r.baseline} <= said
    assert {r.baseline for r in rs if r.baseline} <= said
    assert took < 3.0, f"{took:.2f} s"  # about 0.5 s here; generous for slow CI machines


def test_long_groups_wrap_and_count_the_rest() -> None:
    text, shown = frontplot._label_text([f"#{n}" for n in range(100)])
    lines = text.split("\n")
    assert len(lines) == frontplot._MAX_LINES + 1 and lines[-1] == f"+{100 - len(shown)} more"
    assert all(len(line) <= frontplot._LINE_CHARS + 1 for line in lines)
    assert text.replace("\n", " ").startswith("#0, #1, #2")
    assert frontplot._label_text(["lambda=0.5*", "#3"]) == ("lambda=0.5*, #3", ("lambda=0.5*", "#3"))
