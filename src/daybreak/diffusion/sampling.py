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

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from daybreak.errors import UserError
from daybreak.diffusion.objective import Denoiser, shift_time
from daybreak.schema import Registry, ranged, seed_field


@dataclass(frozen=True)
class Rule:
    """A guidance rule: the branches it reads and how it mixes their x̂0, given the weights (w, w_self)."""

    branches: tuple[str, ...]
    combine: Callable[[dict[str, Tensor], float, float], Tensor]


GUIDANCE = Registry("sample.guidance", {
    "none": Rule(("cond",), lambda p, w, w_self: p["cond"]),
    "cfg": Rule(("cond", "uncond"), lambda p, w, w_self: p["uncond"] + w * (p["cond"] - p["uncond"])),
    "self": Rule(("cond", "routed"), lambda p, w, w_self: p["routed"] + w * (p["cond"] - p["routed"])),
    "cfg+self": Rule(("cond", "uncond", "routed"), lambda p, w, w_self: (
        p["cond"] + (w - 1) * (p["cond"] - p["uncond"]) + (w_self - 1) * (p["cond"] - p["routed"]))),
})


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
        self.rule = GUIDANCE[self.mode]

    def branches(self) -> tuple[str, ...]:
        if self.mode == "cfg" and self.scale <= 1.0:  # PRX: no unconditional pass unless w > 1
            return GUIDANCE["none"].branches
        return self.rule.branches

    def combine(self, p: dict[str, Tensor]) -> Tensor:
        rule = GUIDANCE["none"] if self.branches() == GUIDANCE["none"].branches else self.rule
        return rule.combine(p, self.scale, self.scale if self.self_scale is None else self.self_scale)


def _euler(velocity: Callable[[Tensor, float], Tensor], x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    return x + (sigma_next - sigma) * velocity(x, sigma)


def _heun(velocity: Callable[[Tensor, float], Tensor], x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    v = velocity(x, sigma)
    x_euler = x + (sigma_next - sigma) * v
    if sigma_next == 0:  # σ = 0 has no velocity to average with
        return x_euler
    return x + (sigma_next - sigma) * 0.5 * (v + velocity(x_euler, sigma_next))


# one integration step from sigma to sigma_next
SAMPLERS = Registry("sample.sampler", {"euler": _euler, "heun": _heun})


@dataclass
class SampleConfig:
    """Config section `sample`: the sample grids' and `daybreak sample`'s sampler, guidance and prompts."""

    steps: int = ranged(28, ge=1)
    cfg: float = ranged(3.5, ge=0)
    self_scale: float = 1.0  # the self-guidance weight when guidance is cfg+self
    guidance: GUIDANCE.choices = "cfg"
    self_redraw: bool = False  # self-guidance: a new routed token subset every step (PRX: one per generation)
    sampler: SAMPLERS.choices = "euler"
    shift: float = ranged(3.0, gt=0)
    prompts: list[str] = field(default_factory=list)
    seed: int = seed_field()


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
    sampler: str = "euler",
    progress: bool = False,
) -> Tensor:
    """Integrate from `noise` (B, ...) at σ = 1 to the clean sample at σ = 0 (computed in fp32), the x̂0 of
    `predictor` turned into velocities by the run's `denoiser`."""
    step = SAMPLERS[sampler]
    sigmas = sigma_schedule(steps, shift).tolist()
    branches = guidance.branches()

    def velocity(x: Tensor, sigma: float) -> Tensor:
        t = torch.full((x.shape[0],), sigma, device=x.device)
        x0_hat = guidance.combine(predictor.predict(x, t, branches)).float()
        return denoiser.velocity(x0_hat, x, t, t_clamp=denoiser.sampling_clamp)

    x = noise.float()
    for sigma, sigma_next in tqdm(zip(sigmas[:-1], sigmas[1:]), total=steps, disable=not progress, desc="sampling"):
        x = step(velocity, x, sigma, sigma_next)
    return x
