"""SPRINT (Park et al. 2025): sparse deep blocks, then a learned fusion with the dense shallow features.

Blocks before `start` run dense; blocks `start..end` run on a random `1 − drop_ratio` of the tokens
(PRX: the TREAD span 2..12, drop ratio 0.75); after block `end` the full sequence is rebuilt and
fused with the shallow features saved at the span's entry, and the last blocks run dense again:

    shallow s = stream entering block `start`            (B, N, C)
    deep path Δ = (span output − s) at kept positions,  a learned `mask_token` at dropped ones
    fused = fusion(cat[s, Δ])                             Linear(2C → C)

PRX concatenates the deep output d itself, with the bare mask token at dropped positions. Here the
deep half is the deep path's residual Δ = d − s: on kept tokens that is only a reparametrisation
(a linear map of [s, d] is one of [s, d − s]); on dropped ones it amounts to filling PRX's deep
stream with s + mask_token rather than mask_token alone. It buys a neutral initialisation:
`fusion = [I | I]`, bias 0, mask token 0 give fused = s + Δ, so kept tokens leave the span as in
the dense model, dropped tokens come back unchanged (TREAD), and with nothing dropped the model is
the dense model (up to float rounding). PRX's default-initialised fusion starts from a random mix.

Inference: the fusion is part of the trained network, so the sampler's dense forward must run it,
with nothing dropped (`Sprint.dense_hooks()`, PRX's eval path: p = 0 but still fused). A forward
without these hooks skips the fusion: that differs from training once the fusion has moved from
its init, and it is also what an export to diffusers' PRX (which has no fusion layer) computes.
The routed branch for self-guidance (`routed_hooks`) is the training drop ratio, fused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from daybreak.model.hooks import BlockHook, TokenState, gather_tokens
from daybreak.recipe.base import BuildContext, Ingredient, IngredientConfig, check_span
from daybreak.recipe.tread import StepGenerators, TreadRouter, span_tokens
from daybreak.schema import ranged


class SprintRouter(TreadRouter):
    """TREAD's token selection, with SPRINT's mask-token fusion at the span's exit (also when nothing is dropped)."""

    def __init__(
        self, fusion: nn.Linear, mask_token: Tensor, drop_ratio: float = 0.75, start: int = 2, end: int = 12,
        generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        super().__init__(drop_ratio, start, end, generator)
        self.fusion, self.mask_token = fusion, mask_token

    def _merge(self, full: TokenState, processed: Tensor) -> Tensor:
        shallow = full.x.to(processed.dtype)
        if self._kept is None:
            deep = processed - shallow
        else:
            idx = self._kept.unsqueeze(-1).expand(-1, -1, shallow.shape[-1])
            fill = self.mask_token.to(shallow.dtype).expand_as(shallow)
            deep = fill.scatter(1, idx, processed - gather_tokens(shallow, self._kept))
        return self.fusion(torch.cat([shallow, deep], dim=-1))


@dataclass
class SprintConfig(IngredientConfig):
    """Config section `sprint` (PRX: drop 75 % of the tokens over the TREAD span 2..12)."""

    drop_ratio: float = ranged(0.75, ge=0, lt=1)
    start: int = 2
    end: int = 12

    def check(self, depth: int | None = None) -> None:
        check_span("sprint", self.start, self.end, depth)


class Sprint(Ingredient):
    """SPRINT as a recipe ingredient; its `mask_token` and `fusion` train with the model (AdamW group)."""

    name = "sprint"
    Config = SprintConfig
    at_inference = True  # the fusion is part of the trained network
    conflicts = ("tread",)

    def __init__(self, c: SprintConfig, hidden_size: int, seed: int | None = None) -> None:
        super().__init__()
        self.drop_ratio, self.start, self.end = c.drop_ratio, c.start, c.end
        self.generators = StepGenerators(seed)
        self.mask_token = nn.Parameter(torch.zeros(hidden_size))
        self.fusion = nn.Linear(2 * hidden_size, hidden_size)
        with torch.no_grad():
            eye = torch.eye(hidden_size)
            self.fusion.weight.copy_(torch.cat([eye, eye], dim=1))
            self.fusion.bias.zero_()

    @classmethod
    def from_config(cls, c: SprintConfig, ctx: BuildContext) -> "Sprint":
        return cls(c, ctx.hidden_size, seed=ctx.seed)

    export_drop_warning = ("warning: --drop-sprint-fusion: the SPRINT fusion layer and mask token are left out, so "
                           "the exported transformer runs its blocks straight through (the span's output replaces the "
                           "fused stream); its outputs differ from `daybreak sample` / load_model of this checkpoint")

    @classmethod
    def export_refusal(cls, c: SprintConfig, config: dict) -> str | None:
        return ("a SPRINT model: diffusers' PRXTransformer2DModel has no place for its trained fusion layer and mask "
                "token; pass --drop-sprint-fusion to export the blocks without them")

    @staticmethod
    def block_tokens(c: SprintConfig, n: int, depth: int) -> list[int]:
        return span_tokens(n, depth, c.drop_ratio, c.start, c.end)

    def _router(self, drop_ratio: float, generator: torch.Generator | None) -> SprintRouter:
        return SprintRouter(self.fusion, self.mask_token, drop_ratio, self.start, self.end, generator)

    def block_hooks(self, step: int) -> list[BlockHook]:
        return [self._router(self.drop_ratio, self.generators(step))]

    def dense_hooks(self) -> list[BlockHook]:
        """Hooks for the inference forward: every token through the span, then the trained fusion."""
        return [self._router(0.0, None)]

    def routed_hooks(self, generator: torch.Generator | None = None) -> list[BlockHook]:
        """Hooks for the sparse branch of self-guidance: the training drop ratio, drawn from `generator`."""
        return [self._router(self.drop_ratio, generator)]
