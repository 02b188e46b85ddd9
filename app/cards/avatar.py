"""A placeholder portrait for a card without a picture: the name's initials on a colour of its
own. The same name always gives the same picture, so a regenerated card does not change look."""

from __future__ import annotations

import colorsys
import hashlib

from PIL import Image, ImageDraw, ImageFont

# SillyTavern's portrait proportions (2:3).
AVATAR_SIZE = (400, 600)
_FONT_SIZE = 180


def initials(name: str) -> str:
    """The first letter (or digit) of the name's first two words, upper-cased; `?` if none."""
    letters = [next((c for c in word if c.isalnum()), "") for word in name.split()]
    found = "".join(letter for letter in letters if letter)[:2]
    return found.upper() or "?"


def background(name: str) -> tuple[int, int, int]:
    """A colour chosen by the name's hash: any hue, always dark enough for white letters."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.55, 0.62)
    return round(red * 255), round(green * 255), round(blue * 255)


def placeholder_avatar(name: str) -> Image.Image:
    image = Image.new("RGB", AVATAR_SIZE, background(name))
    draw = ImageDraw.Draw(image)
    # Pillow's own font, so the picture needs no font installed; a letter it lacks is drawn as
    # a box, which is still a placeholder.
    font = ImageFont.load_default(size=_FONT_SIZE)
    centre = (AVATAR_SIZE[0] / 2, AVATAR_SIZE[1] / 2)
    draw.text(centre, initials(name), fill=(255, 255, 255), font=font, anchor="mm")
    return image
