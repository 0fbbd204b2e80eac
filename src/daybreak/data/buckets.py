"""Aspect-ratio buckets: every image is resized (never cropped) to the bucket nearest its aspect.

A bucket is `(height, width)`. `make_buckets` builds a list of buckets holding about `base²` pixels:
for each long side L (a multiple of `step = lcm(multiple, patch)`, from `base` upwards) the short
side is the largest multiple of `step` with `L·short ≤ base²`. A bucket is kept when its aspect
lies in [min_aspect, max_aspect]; the candidate nearest each end of the range (log aspect) is kept
too, so that images at exactly 1:2 or 2:1 have a close bucket. This reproduces the 13 buckets of
diffusers' `ASPECT_RATIO_512_BIN` between 1:2 and 2:1 at 512 px (patch 32: 240–256 tokens; 2:1 is
exactly 352×704 so nothing is added), and gives 27 at 1024 px (984–1024 tokens): 25 in range plus
704×1440 and its transpose (aspect 2.045, 22×45 tokens), which are nearer 2:1 than 736×1408.

Resizing to the nearest bucket distorts the aspect ratio by at most half the gap between
neighbouring buckets (about 7 % at 512 px, whose buckets are ≤ 14.3 % apart in aspect, and 3.5 %
at 1024 px, ≤ 6.9 % apart), which is why no cropping is needed: every pixel of the image is kept.
Images beyond 1:2 or 2:1 are squeezed into the end bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from daybreak.errors import UserError
from daybreak.schema import Registry

Bucket = tuple[int, int]  # (height, width)


def _landscape(base: int, step: int, max_aspect: float) -> list[Bucket]:
    candidates: list[Bucket] = []
    long = base
    while True:
        short = (base * base // long) // step * step
        if short == 0 or long / short > max_aspect * 1.5:
            break
        candidates.append((short, long))
        long += step
    kept = [b for b in candidates if b[1] / b[0] <= max_aspect + 1e-9]
    nearest = min(candidates, key=lambda b: abs(math.log(b[1] / b[0] / max_aspect)))
    return sorted(set(kept) | {nearest}, key=lambda b: b[1] / b[0])


def make_buckets(
    base: int, patch: int, multiple: int = 16, min_aspect: float = 0.5, max_aspect: float = 2.0
) -> list[Bucket]:
    """Buckets of about base² pixels (rule in the module docstring), sorted by width/height."""
    if not (0 < min_aspect <= 1 <= max_aspect):
        raise UserError(f"bucket aspect range must contain 1 (got {min_aspect}–{max_aspect})")
    step = math.lcm(multiple, patch)
    if base % step:
        raise UserError(
            f"data.resolution {base} must be a multiple of {step} (patch {patch}, multiple {multiple})"
        )
    wide = _landscape(base, step, max_aspect)
    tall = [(w, h) for h, w in _landscape(base, step, 1 / min_aspect) if h != w]
    return sorted(set(wide) | set(tall), key=lambda b: b[1] / b[0])


# `data.buckets`: `square` (one base×base bucket, for fixed-size data such as the demo) or `aspect` (make_buckets)
BUCKETS = Registry("data.buckets", {
    "square": lambda base, patch: [(base, base)],
    "aspect": lambda base, patch: make_buckets(base, patch),
})


def resolve_buckets(kind: str, base: int, patch: int) -> list[Bucket]:
    """The buckets of `data.buckets` for base resolution `base` and token side `patch`."""
    return BUCKETS[kind](base, patch)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect is nearest in log ratio (ties: the earlier bucket)."""
    a = math.log(width / height)
    return min(buckets, key=lambda b: abs(a - math.log(b[1] / b[0])))


def resize_to_bucket(img: Image.Image, bucket: Bucket) -> np.ndarray:
    """RGB image resized (bicubic, antialiased) to the bucket → uint8 (H, W, 3)."""
    h, w = bucket
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def uint8_chw(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → uint8 (B, 3, H, W): what the loader ships (a quarter of fp32's bytes)."""
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def bytes_to_pixels(chw: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float in [−1, 1], on the tensor's device (the trainer's GPU)."""
    return chw.float().div_(127.5).sub_(1.0)


def uint8_to_pixels(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [−1, 1]; transposes while still 1 byte/value."""
    return bytes_to_pixels(uint8_chw(batch))


def to_pixels(img: Image.Image, bucket: Bucket) -> torch.Tensor:
    """One image resized to the bucket → float (3, H, W) in [−1, 1]."""
    return uint8_to_pixels(resize_to_bucket(img, bucket)[None])[0]


def token_table(buckets: Sequence[Bucket], patch: int) -> str:
    """One line per bucket: size, aspect, token grid and count at this patch size."""
    lines = [f"{'bucket (HxW)':>13}  {'aspect':>6}  {'grid':>7}  tokens"]
    for h, w in buckets:
        gh, gw = h // patch, w // patch
        lines.append(f"{f'{h}x{w}':>13}  {w / h:6.3f}  {f'{gh}x{gw}':>7}  {gh * gw:6d}")
    return "\n".join(lines)
