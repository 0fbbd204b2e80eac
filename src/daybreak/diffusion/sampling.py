"""Sampling: integrate the flow ODE from noise (σ = 1) to data (σ = 0) with an x0-predicting model.

The model is hidden behind a `Predictor` that returns x̂0 for the branches a guidance rule needs
(conditional, unconditional, routed). Guidance mixes those x̂0 predictions, as PRX does, and only
then is x̂0 turned into a velocity `(x - x̂0) / max(σ, clamp)` by the run's denoiser, with its
`sampling_clamp` (the x-prediction training clamp; none for a v-model, as PRX). CFG with w ≤ 1 runs
the conditional branch alone, as PRX's `do_cfg = guidance_scale > 1`.
Sigmas are the shifted linear schedule of training (shift 3 spends more steps at high noise).
Euler is PRX's sampler; Heun (second order, last step Euler as σ = 0 has no velocity) is daybreak's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from daybreak.errors import UserError
from daybreak.diffusion.objective import Denoiser, shift_time

BRANCHES = {
    "none": ("cond",),
    "cfg": ("cond", "uncond"),
    "self": ("cond", "routed"),
    "cfg+self": ("cond", "uncond", "routed"),
}
GUIDANCE = tuple(BRANCHES)
SAMPLERS = ("euler", "heun")


class Predictor(Protocol):
    def predict(self, x_t: Tensor, t: Tensor, branches: tuple[str, ...]) -> dict[str, Tensor]:
        """x̂0 for each requested branch among "cond", "uncond" (null caption), "routed" (TREAD-routed, conditional)."""
        ...


@dataclass
class Guidance:
    """How branch predictions combine; `self_scale` (default: `scale`) is the self-guidance weight in "cfg+self"."""

    mode: str = "cfg"
    scale: float = 3.5
    self_scale: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in BRANCHES:
            raise UserError(f"unknown guidance {self.mode!r}; choose one of {', '.join(BRANCHES)}")

    def branches(self) -> tuple[str, ...]:
        if self.mode == "cfg" and self.scale <= 1.0:  # PRX: no unconditional pass unless w > 1
            return BRANCHES["none"]
        return BRANCHES[self.mode]

    def combine(self, p: dict[str, Tensor]) -> Tensor:
        w = self.scale
        w_self = self.scale if self.self_scale is None else self.self_scale
        if self.branches() == BRANCHES["none"]:
            return p["cond"]
        if self.mode == "cfg":
            return p["uncond"] + w * (p["cond"] - p["uncond"])
        if self.mode == "self":
            return p["routed"] + w * (p["cond"] - p["routed"])
        return p["cond"] + (w - 1) * (p["cond"] - p["uncond"]) + (w_self - 1) * (p["cond"] - p["routed"])


def sigma_schedule(steps: int, shift: float = 3.0) -> Tensor:
    """(steps + 1,) noise levels from 1 down to 0: shift(linspace(1, 0, steps + 1))."""
    if steps < 1:
        raise UserError(f"sampling needs at least 1 step, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


@torch.no_grad()
def sample(
    predictor: Predictor,
    noise: Tensor,
    *,
    steps: int = 28,
    shift: float = 3.0,
    guidance: Guidance,
    denoiser: Denoiser,
    sampler: Literal["euler", "heun"] = "euler",
    progress: bool = False,
) -> Tensor:
    """Integrate from `noise` (B, ...) at σ = 1 to the clean sample at σ = 0 (computed in fp32), the x̂0 of
    `predictor` turned into velocities by the run's `denoiser`."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose euler or heun")
    sigmas = sigma_schedule(steps, shift).tolist()
    branches = guidance.branches()

    def velocity(x: Tensor, sigma: float) -> Tensor:
        t = torch.full((x.shape[0],), sigma, device=x.device)
        x0_hat = guidance.combine(predictor.predict(x, t, branches)).float()
        return denoiser.velocity(x0_hat, x, t, t_clamp=denoiser.sampling_clamp)

    x = noise.float()
    for sigma, sigma_next in tqdm(zip(sigmas[:-1], sigmas[1:]), total=steps, disable=not progress, desc="sampling"):
        v = velocity(x, sigma)
        x_euler = x + (sigma_next - sigma) * v
        if sampler == "euler" or sigma_next == 0:
            x = x_euler
        else:
            x = x + (sigma_next - sigma) * 0.5 * (v + velocity(x_euler, sigma_next))
    return x
