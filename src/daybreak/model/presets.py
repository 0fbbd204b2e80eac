"""Named transformer sizes: keyword arguments for `PRXTransformer` / diffusers' `PRXTransformer2DModel`.

`prx-small` is the speedrun's pixel model (~1.18 B parameters); `prx-small-latent` the same trunk
on 16-channel VAE latents; `tiny` and `demo` are CPU-sized for tests and the embedded demo.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from daybreak.errors import UserError
from daybreak.schema import ranged

_SMALL = dict(
    in_channels=3, patch_size=32, context_in_dim=2304, hidden_size=1792, mlp_ratio=3.5, num_heads=28, depth=16,
    axes_dim=[32, 32], theta=10000, time_factor=1000.0, time_max_period=10000, bottleneck_size=256,
)  # fmt: skip

PRESETS: dict[str, dict] = {
    "prx-small": _SMALL,
    "prx-small-latent": {**_SMALL, "in_channels": 16, "patch_size": 2, "bottleneck_size": None},
    "tiny": {
        **_SMALL, "patch_size": 4, "context_in_dim": 32, "hidden_size": 64, "num_heads": 4, "depth": 4,
        "axes_dim": [8, 8], "bottleneck_size": 32,
    },
    "demo": {
        **_SMALL, "patch_size": 8, "context_in_dim": 128, "hidden_size": 192, "num_heads": 6, "depth": 6,
        "axes_dim": [16, 16], "bottleneck_size": None,
    },
}  # fmt: skip


def preset(name: str) -> dict:
    """A fresh copy of the named preset's constructor kwargs."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


@dataclass
class ModelConfig:
    """Config section `model`: a preset, then any of diffusers' PRXTransformer2DModel arguments on top of it."""

    preset: Literal[tuple(PRESETS)] = "tiny"
    in_channels: int | None = ranged(None, gt=0)
    patch_size: int | None = ranged(None, gt=0)
    context_in_dim: int | None = ranged(None, gt=0)
    hidden_size: int | None = ranged(None, gt=0)
    mlp_ratio: float | None = ranged(None, gt=0)
    num_heads: int | None = ranged(None, gt=0)
    depth: int | None = ranged(None, gt=0)
    axes_dim: list[int] | None = None
    theta: int | None = ranged(None, gt=0)
    time_factor: float | None = ranged(None, gt=0)
    time_max_period: int | None = ranged(None, gt=0)
    bottleneck_size: int | None = ranged(None, gt=0)

