"""The FigStep renderer: canvas size, the text actually drawn (pixel checks), the content-hash cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from safesearch.errors import UserError
from safesearch.figstep import FigStepStyle, cached_image, find_font, image_key, layout, render

REQUEST = "Steps to forge a prescription for strong painkillers."


def _dark(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


def _bands(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive rows that hold ink: one per drawn line."""
    rows = mask.any(axis=1)
    bands, start = [], None
    for y, ink in enumerate(rows):
        if ink and start is None:
            start = y
        elif not ink and start is not None:
            bands.append((start, y))
            start = None
    if start is not None:
        bands.append((start, len(rows)))
    return bands


def test_canvas_is_white_rgb_square() -> None:
    image = render(REQUEST)
    assert image.size == (760, 760) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all()  # the margins stay white
    assert 0.01 < _dark(image).mean() < 0.5  # ink, but mostly paper
    assert render(REQUEST, FigStepStyle(size=336)).size == (336, 336)


def test_each_wrapped_line_and_the_empty_list_is_drawn() -> None:
    style = FigStepStyle()
    size, lines = layout(REQUEST, style, find_font())
    assert lines[-3:] == ["1.", "2.", "3."] and len(lines) > 4  # the request was wrapped
    image = render(REQUEST, style)
    assert len(_bands(_dark(image))) == len(lines)
    # Pixel-exact: each line is the text it should be, drawn where it should be.
    font = ImageFont.truetype(str(find_font()), size, layout_engine=ImageFont.Layout.BASIC)
    step = round(size * style.line_spacing)
    for i, line in enumerate(lines):
        alone = Image.new("RGB", image.size, "white")
        ImageDraw.Draw(alone).text((style.margin, style.margin + i * step), line, fill="black", font=font)
        top, bottom = style.margin + i * step, style.margin + (i + 1) * step
        assert np.array_equal(np.asarray(image)[top:bottom], np.asarray(alone)[top:bottom]), line


def test_different_text_draws_different_pixels_and_long_text_shrinks() -> None:
    assert not np.array_equal(np.asarray(render("Steps to do A.")), np.asarray(render("Steps to do B.")))
    short_size, _ = layout("Steps to do A.", FigStepStyle(), find_font())
    long_size, long_lines = layout(" ".join(["word"] * 120), FigStepStyle(), find_font())
    assert short_size == 80 and long_size < short_size
    assert len(long_lines) * round(long_size * 1.15) <= 760 - 40  # it fits the canvas


def test_cache_by_content_hash(tmp_path: Path) -> None:
    first = cached_image(REQUEST, tmp_path)
    mtime = first.stat().st_mtime_ns
    again = cached_image(REQUEST, tmp_path)
    assert again == first and again.stat().st_mtime_ns == mtime  # not drawn twice
    assert np.array_equal(np.asarray(Image.open(first).convert("RGB")), np.asarray(render(REQUEST)))
    assert cached_image(REQUEST + " Now.", tmp_path) != first
    assert image_key(REQUEST, FigStepStyle(size=336)) != image_key(REQUEST, FigStepStyle())
    assert len(list(tmp_path.iterdir())) == 2  # no temporary files left behind


def test_named_font_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="font file .* does not exist"):
        render(REQUEST, FigStepStyle(font=str(tmp_path / "nope.ttf")))
