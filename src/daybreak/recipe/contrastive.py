"""Contrastive flow matching (ΔFM, Stoica et al. 2025): push each prediction away from another
sample's target.

Plain flow matching lets conditional flows overlap, so the model drifts towards an average velocity
for similar inputs. ΔFM subtracts λ·MSE(v̂_i, v_j) against the target of a different sample j, here
the batch rolled by one, which makes predictions more distinct per condition. The velocity of the
x̂0 prediction is taken exactly as the flow loss does (same clamp), so both terms live in one space.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from daybreak.flow import FlowObjective
from daybreak.recipe.base import Ingredient, StepTensors


class ContrastiveFlow(Ingredient):
    name = "contrastive"

    def __init__(self, weight: float = 0.05, t_clamp: float = 0.05) -> None:
        super().__init__()
        self.weight = weight
        self.objective = FlowObjective(t_clamp=t_clamp)

    def losses(self, s: StepTensors) -> dict[str, Tensor]:
        if s.x0.shape[0] < 2:  # no other sample to contrast with
            return {"contrastive": s.x0_hat.new_zeros(())}
        v_hat = self.objective.velocity(s.x0_hat, s.x_t, s.t)
        v_other = self.objective.velocity(s.x0, s.x_t, s.t).roll(1, dims=0)
        return {"contrastive": -self.weight * F.mse_loss(v_hat, v_other)}
