"""Deterministic pictures: a PNG that is a pure function of (prompt, seed, size, index).

A gradient background, a few flat shapes and the prompt's first words, with every color and
position drawn from a hash of the prompt and seed: the same request gives byte-identical PNGs
(a retried job sees the same image), different prompts give visibly different ones, and a
1024x1024 picture takes a few tens of milliseconds, most of it PNG compression.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Mapping

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

MIN_SHAPES = 3
MAX_SHAPES = 7
CAPTION_WORDS = 5
# zlib's fastest level: most of the render time is compression, and the pictures are simple
# enough that level 1 costs only a little size.
PNG_COMPRESS_LEVEL = 1

Color = tuple[int, int, int]


def picture_seed(prompt: str, seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def render_png(
    prompt: str,
    seed: int,
    width: int,
    height: int,
    index: int = 0,
    text_chunks: Mapping[str, str] | None = None,
) -> bytes:
    """The PNG of image `index` of a batch; `text_chunks` become PNG tEXt entries (ComfyUI
    keeps its workflow there)."""
    rng = random.Random(picture_seed(prompt, seed, index))
    image = _gradient(rng, width, height)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(MIN_SHAPES, MAX_SHAPES)):
        _shape(draw, rng, width, height)
    _caption(draw, prompt, width, height)
    info = PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_text(key, value)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
    return out.getvalue()


def _color(rng: random.Random) -> Color:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _gradient(rng: random.Random, width: int, height: int) -> Image.Image:
    # Four corner colors blended by one bilinear resize: far cheaper than drawing per pixel.
    corners = Image.new("RGB", (2, 2))
    corners.putdata([_color(rng) for _ in range(4)])
    return corners.resize((width, height), Image.Resampling.BILINEAR)


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    side = min(width, height)
    x, y = rng.randrange(width), rng.randrange(height)
    radius = rng.randint(max(1, side // 12), max(2, side // 4))
    box = (x - radius, y - radius, x + radius, y + radius)
    fill, outline = _color(rng), _color(rng)
    kind = rng.randrange(3)
    if kind == 0:
        draw.ellipse(box, fill=fill, outline=outline, width=max(1, side // 128))
    elif kind == 1:
        draw.rectangle(box, fill=fill, outline=outline, width=max(1, side // 128))
    else:
        corners = [
            (x + rng.randint(-radius, radius), y + rng.randint(-radius, radius)) for _ in range(3)
        ]
        draw.polygon(corners, fill=fill, outline=outline)


def _caption(draw: ImageDraw.ImageDraw, prompt: str, width: int, height: int) -> None:
    caption = " ".join(prompt.split()[:CAPTION_WORDS])
    if not caption or height < 32:
        return
    size = max(8, min(width, height) // 16)
    font = ImageFont.load_default(size=size)
    margin = size // 2
    draw.text(
        (margin, height - margin - size),
        caption,
        font=font,
        fill=(255, 255, 255),
        stroke_width=max(1, size // 16),
        stroke_fill=(0, 0, 0),
    )
