"""The embedded demo dataset: captioned shapes drawn on the fly, so the demo needs no download.

Every item is a pure function of (seed, index), so two runs (or two data-loader workers) see the
same pixels. The grammar is small enough that prompt adherence can be judged from the pixels alone
(see `daybreak.evaluate.adherence`): one saturated shape on a plain near-black background.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw

from daybreak.errors import UserError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "green": (30, 220, 50),
    "blue": (40, 70, 255),
    "yellow": (250, 225, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {  # centre as (x, y) fractions of the side
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.18}  # half-extent as a fraction of the side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (8, 8, 10),
    "dark gray": (38, 38, 40),
    "charcoal": (26, 28, 34),
    "dark brown": (36, 26, 20),
}
JITTER = 0.04  # max offset of the shape's centre, as a fraction of the side
_SUPERSAMPLE = 4  # drawn at 4x then box-filtered down: light anti-aliasing


def short_caption(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} on the {position}"


def long_caption(color: str, shape: str, position: str, size: str, background: str) -> str:
    return f"a {size} {color} {shape} on the {position}, on a plain {background} background"


def _prompts() -> list[str]:
    """30 prompts: every (colour, position) pair once plus five more, ten of each shape."""
    colors, positions = list(COLORS), list(POSITIONS)
    return [
        short_caption(colors[k % 5], SHAPES[k % 3], positions[(k + k // 5) % 5]) for k in range(30)
    ]


SHAPES_PROMPTS: list[str] = _prompts()

_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_POSITION_RE = re.compile(r"\bon the (" + "|".join(POSITIONS) + r")\b")


def parse_prompt(text: str) -> tuple[str, str, str]:
    """(color, shape, position) of a short or long shapes caption; UserError for anything else."""
    lowered = text.lower()
    found = [rx.search(lowered) for rx in (_COLOR_RE, _SHAPE_RE, _POSITION_RE)]
    if not all(found):
        raise UserError(f"not a shapes prompt (need a colour, a shape and 'on the <position>'): {text!r}")
    color, shape, position = (m.group(1) for m in found)  # type: ignore[union-attr]
    return color, shape, position


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    # Equilateral triangle pointing up whose centroid is (cx, cy), circumradius 1.2 r.
    angles = np.deg2rad([-90.0, 30.0, 150.0])
    R = 1.2 * r
    return [(cx + R * np.cos(a), cy + R * np.sin(a)) for a in angles]


def render(
    color: str, shape: str, cx: float, cy: float, half: float, background: str, size: int
) -> Image.Image:
    """Draw one shape centred at (cx, cy) (fractions of the side) with half-extent `half`."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    x, y, r = cx * big, cy * big, half * big
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[color])
    else:
        draw.polygon(_polygon(shape, x, y, r), fill=COLORS[color])
    return image.resize((size, size), Image.BOX)


class ShapesDataset:
    """Map-style dataset of `{"image", "captions": {"short", "long"}, "key"}` samples.

    Item i is drawn from a generator seeded with (seed, i): deterministic and independent of
    access order, so it needs no storage and shards trivially across workers.
    """

    def __init__(self, size: int = 32, seed: int = 0, length: int = 100_000) -> None:
        if not 16 <= size <= 1024:
            raise UserError(f"shapes image size must be between 16 and 1024 px, got {size}")
        if length < 1:
            raise UserError(f"shapes dataset length must be positive, got {length}")
        self.size, self.seed, self.length = size, seed, length

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int) -> tuple:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} shapes")
        index %= self.length
        rng = np.random.default_rng((self.seed, index))
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        return index, color, shape, position, size_name, background, dx, dy

    def meta(self) -> list[tuple[tuple[int, int], tuple[str, ...]]]:
        """Every item's (size, caption columns), for the loader's buckets: all square, both captions."""
        return [((self.size, self.size), ("long", "short"))] * self.length

    def captions(self, index: int) -> dict[str, str]:
        """Item `index`'s captions without drawing its image."""
        _, color, shape, position, size_name, background, _, _ = self._draw(index)
        return {"short": short_caption(color, shape, position),
                "long": long_caption(color, shape, position, size_name, background)}

    def __getitem__(self, index: int) -> dict:
        index, color, shape, position, size_name, background, dx, dy = self._draw(index)
        base_x, base_y = POSITIONS[position]
        image = render(color, shape, base_x + dx, base_y + dy, SIZES[size_name], background, self.size)
        return {
            "image": image,
            "captions": {
                "short": short_caption(color, shape, position),
                "long": long_caption(color, shape, position, size_name, background),
            },
            "key": f"shapes-{self.seed}-{index:07d}",
        }
