"""Resolution-aware conditioning (PRX's `prx/algorithm/resolution_aware.py`): the model is told the size
of its input, so one network can learn resolution-specific behaviour when it trains on several sizes.

The height H and width W of the transformer's input in model space (latent pixels for a VAE model,
pixels for a pixel model) each go through a 128-d sinusoidal embedding (`max_period`, no time factor),
then a learned MLP, in one of two modes:

* `token`: H and W become two extra text tokens, `h_embedder(sin(H))` and `w_embedder(sin(W))` put in
  front of the projected text (after `txt_in`), with a valid mask entry each: every block's attention
  can read them (PRX's default);
* `vec`: `mlp(cat[sin(H), sin(W)])` is added to the timestep vector, so it modulates every block:
  diffusers' `PRXTransformer2DModel(resolution_embeds=True)` (PRX-7B), whose parameter names these are.

Like PRX, the embedders start from PyTorch's default init and train with the AdamW group. They are part
of the network: EMA tracks them, checkpoints hold them (`recipe*.safetensors`), the sampler's forward and
`load_model` run them, `init_from` carries them. `daybreak export` writes the `vec` mode into diffusers'
transformer (when `max_period` is its `time_max_period`) and refuses the `token` mode, which diffusers
has no place for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from daybreak.model.hooks import TokenState
from daybreak.model.layers import MLPEmbedder, ResolutionEmbedder, timestep_embedding
from daybreak.recipe.base import BuildContext, Ingredient, IngredientConfig
from daybreak.schema import Registry, ranged


class ResolutionTokens(nn.Module):
    """`token` mode: (H, W) → two tokens (B, 2, hidden), one MLP for each side (PRX's names)."""

    def __init__(self, hidden_size: int, max_period: float):
        super().__init__()
        self.max_period = max_period
        self.h_embedder = MLPEmbedder(128, hidden_size)
        self.w_embedder = MLPEmbedder(128, hidden_size)

    def forward(self, height: Tensor, width: Tensor, dtype: torch.dtype) -> Tensor:
        h, w = (timestep_embedding(s, 128, self.max_period, 1.0).to(dtype) for s in (height, width))
        return torch.stack([self.h_embedder(h), self.w_embedder(w)], dim=1)


class ResolutionHook:
    """The model-side seam: `condition` runs once before the block loop (see `daybreak.model.hooks`)."""

    def __init__(self, embedder: nn.Module, mode: str) -> None:
        self.embedder, self.mode = embedder, mode

    def condition(self, txt: Tensor, mask: Tensor | None, vec: Tensor, size: tuple[int, int]
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
        b = txt.shape[0]
        height, width = (torch.full((b,), float(s), device=txt.device) for s in size)
        dtype = next(self.embedder.parameters()).dtype
        if self.mode == "vec":
            return txt, mask, vec + self.embedder(height, width, dtype).to(vec.dtype)
        tokens = self.embedder(height, width, dtype).to(txt.dtype)
        if mask is not None:
            mask = torch.cat([mask.new_ones(b, 2), mask], dim=1)
        return torch.cat([tokens, txt], dim=1), mask, vec

    def before_block(self, i: int, state: TokenState) -> TokenState:
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        return state


# `resolution_aware.mode`: two text tokens, or a vector added to the timestep's; (hidden_size, max_period) -> embedder
MODES = Registry("resolution_aware.mode", {"token": ResolutionTokens, "vec": ResolutionEmbedder})


@dataclass
class ResolutionAwareConfig(IngredientConfig):
    """Config section `resolution_aware` (PRX's ResolutionAware: mode token, max_period 10000)."""

    mode: MODES.choices = "token"
    max_period: int = ranged(10000, ge=2)


class ResolutionAware(Ingredient):
    """The ingredient: owns the embedder (`resolution_embedder`, PRX's attribute name) and its hook."""

    name = "resolution_aware"
    Config = ResolutionAwareConfig
    at_inference = True  # the embedder is part of the trained network

    def __init__(self, c: ResolutionAwareConfig, hidden_size: int) -> None:
        super().__init__()
        self.mode = c.mode
        self.resolution_embedder = MODES[c.mode](hidden_size, c.max_period)

    @classmethod
    def from_config(cls, c: ResolutionAwareConfig, ctx: BuildContext) -> "ResolutionAware":
        return cls(c, ctx.hidden_size)

    @classmethod
    def export_refusal(cls, c: ResolutionAwareConfig, config: dict) -> str | None:
        """Only mode vec at diffusers' period is diffusers' `resolution_embeds`."""
        if c.mode == "vec" and c.max_period == config["time_max_period"]:
            return None
        why = ("its resolution tokens (resolution_aware.mode=token)" if c.mode != "vec" else
               f"a resolution embedding of period {c.max_period} (diffusers uses time_max_period={config['time_max_period']})")
        return (f"a resolution-aware model: diffusers' PRXTransformer2DModel has no place for {why}; "
                "only resolution_aware.mode=vec with max_period = model.time_max_period exports")

    @classmethod
    def to_diffusers(cls, c: ResolutionAwareConfig, weights: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
        return {"resolution_embeds": True}, weights  # `resolution_embedder.mlp.*`, diffusers' names

    diffusers_part = "resolution embeddings (resolution_embeds)"

    @classmethod
    def from_diffusers(cls, kwargs: dict, state: dict[str, Tensor]) -> tuple[dict | None, dict[str, Tensor]]:
        if not kwargs.pop("resolution_embeds", False):
            return None, {}
        weights = {k: state.pop(k) for k in [k for k in state if k.startswith("resolution_embedder.")]}
        return {"enabled": True, "mode": "vec", "max_period": kwargs["time_max_period"]}, weights

    def _hooks(self) -> list[ResolutionHook]:
        return [ResolutionHook(self.resolution_embedder, self.mode)]

    def block_hooks(self, step: int) -> list[ResolutionHook]:
        return self._hooks()

    def dense_hooks(self) -> list[ResolutionHook]:
        return self._hooks()
