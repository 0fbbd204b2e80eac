"""Prompt adherence on the shapes demo: did the sample draw the asked colour and shape in the asked place?

The judge reads pixels only. Dark pixels are background; every other pixel votes for the nearest
palette colour after scaling its brightest channel to 255 (so anti-aliased edges, darker or
washed-out renderings still vote for their hue). The winning colour's pixel centroid gives the
position: the centre region is a box of ±`CENTER_BOX` around the middle, otherwise the axis with
the larger offset decides left/right or top/bottom. The shape is template matching: each of the
dataset's shapes is drawn by the dataset's own renderer at that centroid, at a few sizes around
the one whose area equals the colour's pixel count, and the shape whose mask overlaps the colour's
mask best (intersection over union) wins. A rounded square lies between the circle and the
square templates, so a drawing only counts as a circle when it is closer to one.

`patch_seam` measures the grid that pixel-space patch models can leave: the mean absolute
difference between neighbouring pixels across patch borders over the same inside patches.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from daybreak.data.shapes import COLORS, SHAPES, parse_prompt, render

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


# area of each shape drawn with half-extent r, in units of r² (the triangle's circumradius is 1.2 r)
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 3 * np.sqrt(3) / 4 * 1.2**2}
_SCALES = np.linspace(0.8, 1.25, 10)  # sizes tried around the area-matched one


def _lit(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=2) >= DARK


def _shape(mask: np.ndarray, cx: float, cy: float) -> str:
    """The dataset shape whose template, centred at (cx, cy) (fractions of the side), best overlaps `mask`."""
    size = mask.shape[0]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        half = np.sqrt(mask.sum() / _AREA[shape]) / size
        for scale in _SCALES:
            template = _lit(np.asarray(render("white", shape, cx, cy, half * scale, "black", size), dtype=np.float32))
            iou = (template & mask).sum() / max(1, (template | mask).sum())
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


def judge(image: Image.Image | np.ndarray) -> tuple[str | None, str | None, str | None]:
    """(dominant non-background colour, its shape, its position), or (None, None, None) when nothing is drawn."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"judge needs an H×W×3 image, got shape {pixels.shape}")
    pixels = pixels.astype(np.float32)
    height, width = pixels.shape[:2]
    brightest = pixels.max(axis=2)
    ys, xs = np.nonzero(brightest >= DARK)
    if len(ys) < max(1, MIN_PIXELS * height * width):
        return None, None, None
    lit = pixels[ys, xs] / brightest[ys, xs, None] * 255.0
    nearest = ((lit[:, None, :] - _PALETTE_UNIT[None]) ** 2).sum(axis=2).argmin(axis=1)
    votes = np.bincount(nearest, minlength=len(_NAMES))
    winner = int(votes.argmax())
    if votes[winner] < MIN_PIXELS * height * width:
        return None, None, None
    chosen = nearest == winner
    cx = (xs[chosen].mean() + 0.5) / width
    cy = (ys[chosen].mean() + 0.5) / height
    shape = None
    if height == width:
        mask = np.zeros((height, width), dtype=bool)
        mask[ys[chosen], xs[chosen]] = True
        shape = _shape(mask, cx, cy)
    return _NAMES[winner], shape, _position(cx, cy)


def adherence(
    images: list[Image.Image | np.ndarray], prompts: list[str]
) -> tuple[float, list[dict]]:
    """Share of images whose judged colour, shape and position all match their shapes prompt; per
    image the judged values and a hit flag for each (`color_ok`, `shape_ok`, `position_ok`, `hit`)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    per_item = []
    for image, prompt in zip(images, prompts):
        want = dict(zip(("color", "shape", "position"), parse_prompt(prompt)))
        got = dict(zip(("color", "shape", "position"), judge(image)))
        oks = {f"{k}_ok": got[k] == want[k] for k in want}
        per_item.append({"prompt": prompt, **got, **oks, "hit": all(oks.values())})
    score = sum(item["hit"] for item in per_item) / len(per_item) if per_item else 0.0
    return score, per_item


def rates(items: list[dict]) -> dict[str, float]:
    """Share of hits per criterion and for all three together, from `adherence`'s items."""
    n = max(1, len(items))
    return {**{k: sum(i[f"{k}_ok"] for i in items) / n for k in ("color", "shape", "position")},
            "all": sum(i["hit"] for i in items) / n}


def patch_seam(images: list[Image.Image | np.ndarray], patch: int) -> float:
    """Mean |difference| of neighbouring pixels across `patch`-pixel borders ÷ the same inside patches.

    Both directions, all channels, pooled over `images`. A model that leaves no grid scores what
    its training images score (shapes at 32 px: about 0.45, their edges rarely lie on a border);
    visible seams push it above 1.
    """
    x = np.stack([np.asarray(i.convert("RGB") if isinstance(i, Image.Image) else i) for i in images]).astype(np.float64)
    dx, dy = np.abs(np.diff(x, axis=2)), np.abs(np.diff(x, axis=1))
    on_x, on_y = np.arange(1, x.shape[2]) % patch == 0, np.arange(1, x.shape[1]) % patch == 0
    border = np.concatenate([dx[:, :, on_x].ravel(), dy[:, on_y].ravel()]).mean()
    inside = np.concatenate([dx[:, :, ~on_x].ravel(), dy[:, ~on_y].ravel()]).mean()
    return float(border / inside)
