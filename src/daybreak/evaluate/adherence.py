"""Prompt adherence on the shapes demo: did the sample draw the asked colour in the asked place?

The judge reads pixels only. Dark pixels are background; every other pixel votes for the nearest
palette colour after scaling its brightest channel to 255 (so anti-aliased edges, darker or
washed-out renderings still vote for their hue). The winning colour's pixel centroid gives the
position: the centre region is a box of ±`CENTER_BOX` around the middle, otherwise the axis with
the larger offset decides left/right or top/bottom.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from daybreak.data.shapes import COLORS, parse_prompt

DARK = 80  # a pixel whose brightest channel is below this is background
CENTER_BOX = 0.125  # half-side of the centre region, as a fraction of the image side
MIN_PIXELS = 0.004  # a colour needs this share of the image to count as drawn

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _NAMES], dtype=np.float32)
_PALETTE_UNIT = _PALETTE / _PALETTE.max(axis=1, keepdims=True) * 255.0


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_BOX:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def judge(image: Image.Image | np.ndarray) -> tuple[str | None, str | None]:
    """(dominant non-background colour, its position), or (None, None) when nothing is drawn."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"judge needs an H×W×3 image, got shape {pixels.shape}")
    pixels = pixels.astype(np.float32)
    height, width = pixels.shape[:2]
    brightest = pixels.max(axis=2)
    ys, xs = np.nonzero(brightest >= DARK)
    if len(ys) < max(1, MIN_PIXELS * height * width):
        return None, None
    lit = pixels[ys, xs] / brightest[ys, xs, None] * 255.0
    nearest = ((lit[:, None, :] - _PALETTE_UNIT[None]) ** 2).sum(axis=2).argmin(axis=1)
    votes = np.bincount(nearest, minlength=len(_NAMES))
    winner = int(votes.argmax())
    if votes[winner] < MIN_PIXELS * height * width:
        return None, None
    chosen = nearest == winner
    cx = (xs[chosen].mean() + 0.5) / width
    cy = (ys[chosen].mean() + 0.5) / height
    return _NAMES[winner], _position(cx, cy)


def adherence(
    images: list[Image.Image | np.ndarray], prompts: list[str]
) -> tuple[float, list[dict]]:
    """Share of images whose judged colour and position both match their shapes prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    per_item = []
    for image, prompt in zip(images, prompts):
        want_color, _, want_position = parse_prompt(prompt)
        color, position = judge(image)
        per_item.append({
            "prompt": prompt,
            "color": color,
            "position": position,
            "hit": color == want_color and position == want_position,
        })
    score = sum(item["hit"] for item in per_item) / len(per_item) if per_item else 0.0
    return score, per_item
