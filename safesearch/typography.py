"""MM-SafetyBench's TYPO image, drawn locally: the request's key phrase typed in black on white.

After Liu et al., "MM-SafetyBench" (ECCV 2024): a canvas 1024 px wide, the phrase in a bold monospace font
at size 90, wrapped to the width, the height growing with the lines. Their FreeMonoBold is replaced by the
DejaVu Sans Mono Bold that :mod:`safesearch.figstep` draws with, for the same reason: every machine then
draws the same pixels. The font lookup, the word wrap and the font cache are FigStep's, so the two
attacks differ only in what they draw, not in how.

Images are cached by content hash, like FigStep's, under a key tagged "typo": a TYPO image and a FigStep
image of the same text never share a file, even in one cache folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from safesearch.datasets.items import Item
from safesearch.errors import UserError
from safesearch.figstep import cached_png, drawing_key, find_font, load_font, wrap


@dataclass(frozen=True)
class TypoStyle:
    width: int = 1024  # MM-SafetyBench's canvas width
    font_size: int = 90  # and their font size: the phrase is never shrunk, the canvas grows instead
    margin: int = 20
    line_spacing: float = 1.15
    font: str | None = None  # a .ttf file; None: the bundled DejaVu Sans Mono Bold (figstep.find_font)


def typo_lines(text: str, style: TypoStyle, font_path: Path) -> list[str]:
    """The lines drawn: ``text`` with its whitespace (line breaks included) collapsed, wrapped to the canvas
    less its margins. MM-SafetyBench joins the lines of a phrase too."""
    return wrap(text, load_font(str(font_path), style.font_size), style.width - 2 * style.margin)


def render_typo(text: str, style: TypoStyle = TypoStyle()) -> Image.Image:
    """The TYPO image of ``text``: black text on a white RGB canvas ``width`` wide, as tall as its lines."""
    font_path = find_font(style.font)
    lines = typo_lines(text, style, font_path)
    if not lines:
        # an empty image would still be shown to the model, and scored as an attack that drew nothing
        raise UserError("typography: nothing to draw (the key phrase is blank)")
    font = load_font(str(font_path), style.font_size)
    step = round(style.font_size * style.line_spacing)
    image = Image.new("RGB", (style.width, 2 * style.margin + len(lines) * step), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((style.margin, style.margin + i * step), line, fill="black", font=font)
    return image


def typo_key(text: str, style: TypoStyle) -> str:
    """The content hash naming a rendering: a "typo" tag, the text, the style and the font's bytes. The tag
    keeps it apart from :func:`safesearch.figstep.image_key`, whose blob has no such field."""
    return drawing_key({"attack": "typo", "text": text, "style": asdict(style)}, style.font)


def cached_typo(text: str, cache_dir: Path, style: TypoStyle = TypoStyle()) -> Path:
    """The path of the TYPO PNG of ``text`` under ``cache_dir``, rendered on first use."""
    return cached_png(cache_dir, typo_key(text, style), lambda: render_typo(text, style))


def qr_prompt_parts(item: Item, cache_dir: Path, style: TypoStyle = TypoStyle()) -> tuple[str, Path]:
    """The text turn and the image of ``item``'s query-relevant attack: the data set's image when it was
    there, else the TYPO image of the key phrase, drawn here (the reader then chose the TYPO question)."""
    if item.qr is None:
        raise UserError(
            f"item '{item.id}' has no query-relevant attack material (only MM-SafetyBench items have it)"
        )
    image = item.qr.image if item.qr.image is not None else cached_typo(item.qr.key_phrase, cache_dir, style)
    return item.qr.question, image
