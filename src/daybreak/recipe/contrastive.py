"""Contrastive flow matching (ΔFM, Stoica et al. 2025, arXiv:2506.05350): push each prediction away
from another sample's target.

Plain flow matching lets conditional flows overlap, so the model drifts towards an average velocity
for similar inputs. ΔFM subtracts λ·MSE(v̂_i, v_j) against the target of a different sample j, here
the batch rolled by one, which makes predictions more distinct per condition. Both velocities come
from the run's own denoiser (same prediction type and t clamp as the flow loss), so the two terms
live in one space.

This file is also the worked example of an ingredient: a config dataclass (its ranges on its fields),
`from_config`, and the one method it needs (`losses`); `recipe/__init__.py` lists it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from daybreak.diffusion.objective import Denoiser
from daybreak.recipe.base import BuildContext, Ingredient, IngredientConfig, StepTensors
from daybreak.schema import ranged


@dataclass
class ContrastiveConfig(IngredientConfig):
    """Config section `contrastive` (PRX's ablation: λ = 0.05)."""

    weight: float = ranged(0.05, ge=0)


class ContrastiveFlow(Ingredient):
    name = "contrastive"
    Config = ContrastiveConfig

    def __init__(self, c: ContrastiveConfig, denoiser: Denoiser) -> None:
        super().__init__()
        self.weight = c.weight
        self.denoiser = denoiser

    @classmethod
    def from_config(cls, c: ContrastiveConfig, ctx: BuildContext) -> "ContrastiveFlow":
        return cls(c, ctx.denoiser)

    def losses(self, s: StepTensors) -> dict[str, Tensor]:
        if s.x0.shape[0] < 2:  # no other sample to contrast with
            return {"contrastive": s.x0_hat.new_zeros(())}
        v_hat = self.denoiser.velocity(s.x0_hat, s.x_t, s.t)
        v_other = self.denoiser.velocity(s.x0, s.x_t, s.t).roll(1, dims=0)
        return {"contrastive": -self.weight * F.mse_loss(v_hat, v_other)}
