"""Pictures of a run's rankings: one query beside its top-K, each framed by whether it is right.

Every tile has the same size whatever the images' sizes (the image is fitted
into a ``thumb_px`` square on grey), so a panel's pixel size depends only on
``k`` and ``thumb_px`` (:func:`panel_size`). Frames: blue for the query, green
for a right answer, red for a wrong one, grey where the split has no ground
truth. Under each tile: the rank and similarity, then the image's name, then
(``text_lines`` > 0, e.g. a caption run's gallery captions) the tile's text wrapped
on up to ``text_lines`` lines, the last cut with "..." when it does not fit.

Example:
    >>> layout = PanelLayout(k=10, thumb_px=128)
    >>> layout.size
    (1660, 190)
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from utils.atomic import atomic_write_bytes

QUERY_RGB = (30, 90, 230)
RIGHT_RGB = (0, 190, 0)
WRONG_RGB = (220, 0, 0)
UNKNOWN_RGB = (150, 150, 150)
BACKGROUND_RGB = (255, 255, 255)
FILL_RGB = (200, 200, 200)  # behind an image that is not square
TEXT_RGB = (0, 0, 0)


@dataclass(frozen=True)
class PanelLayout:
    """Where everything goes in a panel of the query and ``k`` results."""

    k: int
    thumb_px: int = 128
    frame_px: int = 6  # frame width around each thumbnail
    margin_px: int = 8  # around the panel
    gap_px: int = 8  # between tiles
    query_gap_px: int = 24  # extra space between the query and its results
    label_px: int = 34  # two lines of text under each tile
    text_lines: int = 0  # lines of wrapped text (a caption) under those two
    text_line_px: int = 12

    @property
    def tile_px(self) -> int:
        """Side of one framed thumbnail."""
        return self.thumb_px + 2 * self.frame_px

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the panel in pixels."""
        width = 2 * self.margin_px + (self.k + 1) * self.tile_px + self.k * self.gap_px + self.query_gap_px
        height = 2 * self.margin_px + self.tile_px + self.label_px + self.text_lines * self.text_line_px
        return width, height

    def tile_box(self, position: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), exclusive, of a framed tile: 0 = the query, 1..k = rank 1..k."""
        if not 0 <= position <= self.k:
            raise ValueError(f"position {position} outside 0..{self.k}")
        left = self.margin_px + position * (self.tile_px + self.gap_px) + (self.query_gap_px if position else 0)
        top = self.margin_px
        return left, top, left + self.tile_px, top + self.tile_px


@dataclass
class Tile:
    """One image of a panel: its picture, its caption lines and whether it is a right answer."""

    image: Image.Image
    name: str
    caption: str  # first line, e.g. "#3  0.812"
    correct: bool | None  # None: no ground truth for this split
    text: str = ""  # wrapped under the name when the layout has text_lines


def thumbnail(img: Image.Image, side_px: int) -> Image.Image:
    """``img`` fitted into a ``side_px`` square (aspect kept, grey around it; a side of at least 1 px, so an image
    far thinner than it is tall, say 1 x 256, still draws where ``ImageOps.pad`` asked for a 0 px wide resize)."""
    scale = side_px / max(img.size)
    size = (min(side_px, max(1, round(img.width * scale))), min(side_px, max(1, round(img.height * scale))))
    canvas = Image.new("RGB", (side_px, side_px), FILL_RGB)
    canvas.paste(img.convert("RGB").resize(size, Image.Resampling.BILINEAR), ((side_px - size[0]) // 2, (side_px - size[1]) // 2))
    return canvas


def printable(text: str) -> str:
    """``text`` on one line: control characters (a newline or tab in a file name) shown as escapes, e.g. ``\\n``."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width_px: int) -> str:
    """``text`` on one line (:func:`printable`), cut from the left with an ellipsis until it fits ``width_px``."""
    text = printable(text)
    if draw.textlength(text, font=font) <= width_px:
        return text
    while text and draw.textlength("..." + text, font=font) > width_px:
        text = text[1:]
    return "..." + text


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width_px: int, max_lines: int) -> list[str]:
    """``text`` (:func:`printable`) wrapped at spaces into lines of at most ``width_px``; a word wider than
    a line is cut; past ``max_lines`` the last line ends with "..." (it still fits)."""
    words = printable(text).split()
    lines: list[str] = []
    line = ""
    while words and len(lines) < max_lines:
        word = words[0]
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width_px:
            line, words = candidate, words[1:]
        elif line:
            lines.append(line)
            line = ""
        else:  # one word wider than the line: as many characters as fit
            cut = 1
            while cut < len(word) and draw.textlength(word[: cut + 1], font=font) <= width_px:
                cut += 1
            lines.append(word[:cut])
            words = [word[cut:], *words[1:]] if word[cut:] else words[1:]
    if line and len(lines) < max_lines:
        lines.append(line)
        line = ""
    if (words or line) and lines:
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width_px:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def frame_rgb(correct: bool | None) -> tuple[int, int, int]:
    """Frame colour of a result tile."""
    if correct is None:
        return UNKNOWN_RGB
    return RIGHT_RGB if correct else WRONG_RGB


def draw_panel(query: Tile, results: list[Tile], layout: PanelLayout) -> Image.Image:
    """The query's tile (blue frame) followed by its results in rank order."""
    if len(results) > layout.k:
        raise ValueError(f"{len(results)} results for a panel of k={layout.k}")
    panel = Image.new("RGB", layout.size, BACKGROUND_RGB)
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    for position, tile in enumerate([query, *results]):
        left, top, right, bottom = layout.tile_box(position)
        colour = QUERY_RGB if position == 0 else frame_rgb(tile.correct)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=colour)
        panel.paste(thumbnail(tile.image, layout.thumb_px), (left + layout.frame_px, top + layout.frame_px))
        for line, text in enumerate((tile.caption, tile.name)):
            draw.text((left, bottom + 3 + 15 * line), _fit_text(draw, text, font, layout.tile_px), fill=TEXT_RGB, font=font)
        for line, text in enumerate(wrap_text(draw, tile.text, font, layout.tile_px, layout.text_lines) if layout.text_lines else []):
            draw.text((left, bottom + 3 + 30 + layout.text_line_px * line), text, fill=TEXT_RGB, font=font)
    return panel


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` as a PNG atomically."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class PageRow:
    """One query's line on the HTML page."""

    png: str  # path relative to the page
    query: str
    note: str  # e.g. "first right answer at rank 3"
    details: tuple[str, ...] = ()  # listed under the panel, e.g. "#1 name: caption"


def write_page(path: str | Path, title: str, intro: str, rows: list[PageRow]) -> Path:
    """An HTML page listing every panel PNG, with the query name and a note each."""
    items = "".join(
        f'<div class="q"><p><b>{html.escape(r.query)}</b> - {html.escape(r.note)}</p>'
        f'<a href="{html.escape(r.png)}"><img src="{html.escape(r.png)}" alt="{html.escape(r.query)}"></a>'
        + (f'<ol>{"".join(f"<li>{html.escape(d)}</li>" for d in r.details)}</ol>' if r.details else "") + "</div>"
        for r in rows
    )
    page = (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>"
        "body{font:13px sans-serif;margin:16px}.q{margin-bottom:14px}img{max-width:100%}"
        f"</style><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{items}"
    )
    return atomic_write_bytes(path, page.encode())


BOX_RGB = (255, 0, 255)  # a detected face box: magenta, rare in photos and in the styles of the gallery
BOX_WIDTH_PX = 3
BOX_LABEL_PX = 18


def draw_face_box(img: Image.Image, box: Sequence[float] | None, label: str, max_side_px: int) -> Image.Image:
    """``img`` (scaled so its longer side is at most ``max_side_px``) with ``box`` (x0, y0, x1, y1 in the
    image's own pixels; None or NaN: no face) outlined in :data:`BOX_RGB`, and ``label`` on a band below."""
    img = img.convert("RGB")
    scale = min(1.0, max_side_px / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (img.width, img.height + BOX_LABEL_PX), BACKGROUND_RGB)
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    if box is not None and all(math.isfinite(v) for v in box):
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle((round(x0), round(y0), round(x1), round(y1)), outline=BOX_RGB, width=BOX_WIDTH_PX)
    font = ImageFont.load_default()
    draw.text((2, img.height + 3), _fit_text(draw, label, font, img.width - 4), fill=TEXT_RGB, font=font)
    return canvas
