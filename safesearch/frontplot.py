"""The front plot of ``safesearch pareto``: every trial, the front joined up, baselines and reference
checkpoints marked, and labels that never overlap.

Points with identical scores share one label; labels are placed one at a time, most crowded points first,
on the cheapest free spot around their point (see :func:`_place_labels`), so the layout is deterministic.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesearch.pareto import TrialRecord, front

# Colours: plain trials, infeasible trials, the front, baselines, reference checkpoints, mixed labels.
_GREY, _PALE, _FRONT, _BASE, _REF, _MIXED = "#9aa5b1", "#c9ced4", "#d1495b", "#00798c", "#edae49", "#333333"
_LABEL_PT = 7  # label font size (points)
_LINE_CHARS = 34  # a label wraps after this many characters ...
_MAX_LINES = 4  # ... and says "+N more" past this many lines
_GAP_PX = 2.0  # clear space kept around every label box (pixels)
_LEADER_PX = 10.0  # labels further than this from their point get a leader line
_RINGS_PX = (3, 8, 15, 24, 36, 52, 72, 98, 130, 170)  # candidate distances from the point (pixels)


@dataclass
class PlotLabel:
    """One label of the front plot: its artist, the point it names and what it names (trial ``#N``,
    baseline labels with their marks, ``NAME (holdout)``), in the order printed."""

    artist: Any  # matplotlib.text.Annotation
    xy: tuple[float, float]
    names: tuple[str, ...]
    leader: Any = None  # matplotlib.lines.Line2D from the point to a label placed away from it


@dataclass
class FrontPlot:
    """The laid-out front plot, for callers (and tests) that look at it before it is closed."""

    fig: Any
    ax: Any
    labels: list[PlotLabel]


def plot_front(
    rs: Sequence[TrialRecord],
    directions: Mapping[str, str],
    out: Path,
    title: str,
    references: Mapping[str, Mapping[str, float]] | None = None,
    *,
    inspect: Callable[[FrontPlot], None] | None = None,
) -> Path:
    """A PNG of the first two objectives: every trial, the front joined up, baselines and reference
    checkpoints (their holdout scores, when validated) marked. Written to a temp file, then renamed.

    Front trials (``#N``), baselines and references are labelled; points with identical scores share one
    label, and labels are placed so that no two overlap (see ``_place_labels``). ``inspect``, when given,
    is called with the figure after it is saved and before it is closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(directions)
    if len(names) < 2:
        names = names * 2
    x_name, y_name = names[0], names[1]
    fr = front(rs, directions)
    on_front = {r.number for r in fr}
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    markers: list[tuple[float, float, float, float]] = []  # x, y, radius (points), weight

    def mark(xs: list[float], ys: list[float], radius_pt: float, weight: float) -> None:
        markers.extend((x, y, radius_pt, weight) for x, y in zip(xs, ys, strict=True))

    plain = [r for r in rs if not r.baseline and r.scores]
    xs, ys = [r.scores[x_name] for r in plain if r.feasible], [r.scores[y_name] for r in plain if r.feasible]
    ax.scatter(xs, ys, s=22, c=_GREY, label="trials")
    mark(xs, ys, math.sqrt(22) / 2, 0.2)
    infeasible = [r for r in plain if not r.feasible]
    if infeasible:
        xs, ys = [r.scores[x_name] for r in infeasible], [r.scores[y_name] for r in infeasible]
        ax.scatter(xs, ys, s=22, marker="x", c=_PALE, label="infeasible")
        mark(xs, ys, math.sqrt(22) / 2, 0.2)
    pts = sorted((r.scores[x_name], r.scores[y_name]) for r in fr)
    if pts:
        ax.plot(*zip(*pts, strict=True), "-o", c=_FRONT, ms=6, lw=1.5, label="Pareto front")
        mark([p[0] for p in pts], [p[1] for p in pts], 3.0, 3.0)
    base = [r for r in rs if r.baseline and r.scores]
    if base:
        xs, ys = [r.scores[x_name] for r in base], [r.scores[y_name] for r in base]
        ax.scatter(xs, ys, s=60, marker="D", facecolors="none", edgecolors=_BASE, lw=1.5, label="baselines")
        mark(xs, ys, math.sqrt(60) / 2, 3.0)
    refs = [(name, sc) for name, sc in (references or {}).items() if x_name in sc and y_name in sc]
    for _, sc in refs:
        ax.scatter([sc[x_name]], [sc[y_name]], s=70, marker="s", c=_REF)
        mark([sc[x_name]], [sc[y_name]], math.sqrt(70) / 2, 3.0)
    ax.set_xlabel(f"{x_name} ({directions[x_name]}, search split)")
    ax.set_ylabel(f"{y_name} ({directions[y_name]}, search split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    # What each labelled point says: references, then baselines, then front trials, one label per point.
    groups: dict[tuple[float, float], list[tuple[int, str]]] = {}

    def add(x: float, y: float, kind: int, text: str) -> None:
        if math.isfinite(x) and math.isfinite(y):
            groups.setdefault((round(x, 9), round(y, 9)), []).append((kind, text))

    for name, sc in refs:
        add(sc[x_name], sc[y_name], 0, f"{name} (holdout)")
    for r in base:
        text = r.baseline + ("*" if r.number in on_front else "") + ("" if r.feasible else " (infeasible)")
        add(r.scores[x_name], r.scores[y_name], 1, text)
    for r in sorted(fr, key=lambda r: r.number):
        if not r.baseline:
            add(r.scores[x_name], r.scores[y_name], 2, f"#{r.number}")
    colours = (_MIXED, _BASE, _FRONT)
    pending = []
    for xy, members in groups.items():
        kinds = {k for k, _ in members}
        colour = colours[kinds.pop()] if len(kinds) == 1 else _MIXED
        text, shown = _label_text([t for _, t in members])
        pending.append((xy, text, shown, colour))
    labels = _place_labels(fig, ax, pending, markers, pts)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.png")
    try:
        fig.savefig(tmp, bbox_inches="tight")
        if inspect is not None:
            inspect(FrontPlot(fig, ax, labels))
    finally:
        plt.close(fig)
    tmp.replace(out)
    return out


def _label_text(parts: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """``parts`` joined by ", ", wrapped at ``_LINE_CHARS``, at most ``_MAX_LINES`` lines (the rest
    counted as "+N more"); and the parts that made it into the text."""
    lines: list[str] = []
    line = ""
    for i, part in enumerate(parts):
        if line and len(line) + 2 + len(part) > _LINE_CHARS:
            if len(lines) == _MAX_LINES - 1:
                lines.append(line + ",")
                lines.append(f"+{len(parts) - i} more")
                return "\n".join(lines), tuple(parts[:i])
            lines.append(line + ",")
            line = part
        else:
            line = f"{line}, {part}" if line else part
    lines.append(line)
    return "\n".join(lines), tuple(parts)


def _overlap(boxes: Any, others: Any) -> Any:
    """Intersection areas, boxes (n, 4) against others (m, 4), each row x0, y0, x1, y1: an (n, m) array."""
    import numpy as np

    w = np.minimum(boxes[:, None, 2], others[None, :, 2]) - np.maximum(boxes[:, None, 0], others[None, :, 0])
    h = np.minimum(boxes[:, None, 3], others[None, :, 3]) - np.maximum(boxes[:, None, 1], others[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _boxes(ll: Any, w: float, h: float) -> Any:
    """Boxes (n, 4) of size w x h from their lower-left corners (n, 2)."""
    import numpy as np

    return np.stack([ll[:, 0], ll[:, 1], ll[:, 0] + w, ll[:, 1] + h], axis=1)


def _free(boxes: Any, placed: Any) -> Any:
    """Which boxes keep ``_GAP_PX`` clear of every placed box."""
    import numpy as np

    if not len(placed):
        return np.ones(len(boxes), dtype=bool)
    grown = boxes + np.array([-_GAP_PX, -_GAP_PX, _GAP_PX, _GAP_PX])
    return ~(_overlap(grown, placed) > 0).any(axis=1)


def _candidates(px: float, py: float, w: float, h: float) -> Any:
    """Lower-left corners (n, 2) of candidate boxes (w x h) around the point, nearest first.

    On each ring of ``_RINGS_PX`` the box sits in one of 8 (first two rings) or 16 directions, a corner
    or an edge facing the point at that distance (upper right first)."""
    import numpy as np

    xs, ys = [], []
    for i, r in enumerate(_RINGS_PX):
        n = 8 if i < 2 else 16
        ang = np.deg2rad(45.0 + np.arange(n) * (360.0 / n))
        # upper right, upper left, lower left, lower right first, then the ones in between
        order = np.concatenate([np.arange(0, n, n // 4), np.setdiff1d(np.arange(n), np.arange(0, n, n // 4))])
        c, s = np.cos(ang[order]), np.sin(ang[order])
        cx = px + r * c + (w / 2) * np.clip(c * math.sqrt(2), -1, 1)
        cy = py + r * s + (h / 2) * np.clip(s * math.sqrt(2), -1, 1)
        xs.append(cx - w / 2)
        ys.append(cy - h / 2)
    return np.stack([np.concatenate(xs), np.concatenate(ys)], axis=1)


def _place_labels(
    fig: Any,
    ax: Any,
    pending: Sequence[tuple[tuple[float, float], str, tuple[str, ...], str]],
    markers: Sequence[tuple[float, float, float, float]],
    line: Sequence[tuple[float, float]] = (),
) -> list[PlotLabel]:
    """Annotate each (xy, text, names, colour) of ``pending`` so that no two label boxes overlap.

    ``markers`` are the plotted points (x, y, radius in points, weight) and ``line`` the front's
    polyline, both in data coordinates: labels avoid covering them (weighted by area).

    Deterministic and greedy, in display pixels after one draw (which also fixes the limits and the
    legend's place): the most crowded points go first; each label takes the cheapest spot clear of the
    labels placed so far among candidates around its point (cost: distance, plus covered markers, line,
    legend and area outside the axes); failing that, the cheapest clear spot on a grid over the axes;
    failing that, a column right of the axes. Labels away from their point get a leader line."""
    import numpy as np
    from matplotlib.lines import Line2D

    if not pending:
        return []
    fig.canvas.draw()
    ax.set_autoscale_on(False)
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    pad_px = 0.15 * _LABEL_PT * px_per_pt  # the white box around the text
    bbox = {"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}

    anchors = ax.transData.transform(np.array([xy for xy, *_ in pending], dtype=float))
    sizes = []
    for _, text, _, _ in pending:
        probe = ax.text(0, 0, text, fontsize=_LABEL_PT)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((ext.width + 2 * pad_px, ext.height + 2 * pad_px))

    # What labels should not cover: markers, the front's line (sampled every 3 px), the legend.
    soft, soft_w = [np.empty((0, 4))], [np.empty(0)]
    if markers:
        m = np.array(markers, dtype=float)
        c = ax.transData.transform(m[:, :2])
        rad = m[:, 2] * px_per_pt
        ok = np.isfinite(c).all(axis=1)
        soft.append(np.stack([c[:, 0] - rad, c[:, 1] - rad, c[:, 0] + rad, c[:, 1] + rad], axis=1)[ok])
        soft_w.append(m[ok, 3])
    if len(line) > 1:
        v = ax.transData.transform(np.array(line, dtype=float))
        samples = [
            a + (b - a) * t[:, None]
            for a, b in itertools.pairwise(v)
            for t in [np.linspace(0, 1, max(2, int(np.hypot(*(b - a)) / 3) + 1))]
        ]
        s = np.concatenate(samples)
        s = s[np.isfinite(s).all(axis=1)]
        soft.append(np.concatenate([s - 1.5, s + 1.5], axis=1))
        soft_w.append(np.full(len(s), 0.5))
    legend = ax.get_legend()
    if legend is not None:
        lb = legend.get_window_extent(renderer)
        soft.append(np.array([[lb.x0, lb.y0, lb.x1, lb.y1]]))
        soft_w.append(np.array([5.0]))
    soft_boxes, soft_weights = np.concatenate(soft), np.concatenate(soft_w)
    axes_box = ax.get_window_extent(renderer)
    axes_rect = np.array([[axes_box.x0, axes_box.y0, axes_box.x1, axes_box.y1]])
    grid = np.stack(np.meshgrid(np.arange(axes_box.x0, axes_box.x1, 6.0),
                                np.arange(axes_box.y0, axes_box.y1, 6.0)), axis=-1).reshape(-1, 2)

    def gaps(b: Any, px: float, py: float) -> Any:  # from the point to each box
        dx = np.maximum(np.maximum(b[:, 0] - px, px - b[:, 2]), 0.0)
        dy = np.maximum(np.maximum(b[:, 1] - py, py - b[:, 3]), 0.0)
        return np.hypot(dx, dy)

    # Most crowded first (most other labelled points within 40 px), then left to right.
    near = np.hypot(*(anchors[:, None, :] - anchors[None, :, :]).transpose(2, 0, 1)) < 40
    order = sorted(range(len(pending)), key=lambda i: (-int(near[i].sum()), *anchors[i]))
    placed = np.empty((0, 4))
    spots: dict[int, tuple[float, float]] = {}
    for i in order:
        (px, py), (w, h) = anchors[i], sizes[i]
        ll = _candidates(px, py, w, h)
        ok = _free(_boxes(ll, w, h), placed)
        if not ok.any():
            ll = grid - np.array([w / 2, h / 2])
            ok = _free(_boxes(ll, w, h), placed)
        if ok.any():
            b = _boxes(ll, w, h)
            gap = gaps(b, px, py)
            covered = _overlap(b, soft_boxes) @ soft_weights
            outside = w * h - _overlap(b, axes_rect)[:, 0]
            cost = gap + gap**2 / 150 + covered + 5.0 * outside + 1e-3 * np.arange(len(b))
            x0, y0 = ll[int(np.argmin(np.where(ok, cost, np.inf)))]
        else:
            x0, y0 = axes_box.x1 + 8.0, axes_box.y1 - h
            while not _free(_boxes(np.array([[x0, y0]]), w, h), placed)[0]:
                y0 -= h / 2
        spots[i] = (float(x0), float(y0))
        placed = np.concatenate([placed, [[x0, y0, x0 + w, y0 + h]]])

    labels = []
    to_data = ax.transData.inverted()
    for i, (xy, text, names, colour) in enumerate(pending):
        (px, py), (w, h), (x0, y0) = anchors[i], sizes[i], spots[i]
        artist = ax.annotate(
            text, xy, xytext=(x0 + pad_px - px, y0 + pad_px - py), textcoords="offset pixels",
            ha="left", va="bottom", fontsize=_LABEL_PT, color=colour, bbox=bbox, annotation_clip=False,
        )
        leader = None
        end = np.array([min(max(px, x0), x0 + w), min(max(py, y0), y0 + h)])
        gap = float(np.hypot(*(end - (px, py))))
        if gap > _LEADER_PX:  # from the marker's edge to the label's nearest edge, in data coordinates
            start = np.array([px, py]) + (end - (px, py)) * (3.5 * px_per_pt / gap)
            (sx, sy), (ex, ey) = to_data.transform(np.array([start, end]))
            leader = Line2D([sx, ex], [sy, ey], color=colour, lw=0.6, alpha=0.8, zorder=2.5, clip_on=False)
            ax.add_line(leader)
        labels.append(PlotLabel(artist, xy, names, leader))
    return labels
