"""The recipe's ingredients, by name. The trainer, the sampler and the planner see only `Ingredient`s.

Adding an ingredient is one file in this package (its config dataclass, `from_config`, the hooks
or losses it adds) and one line in `INGREDIENTS`. Its config section is the registry key, so
`tread.enabled=true` switches on `INGREDIENTS["tread"]`; the order here is the order of the
sections in a resolved config and of the hooks around each block.
"""

from __future__ import annotations

from daybreak.errors import UserError
from daybreak.recipe.base import BuildContext, Ingredient, StepTensors
from daybreak.recipe.contrastive import ContrastiveFlow
from daybreak.recipe.perceptual import PerceptualLoss
from daybreak.recipe.repa import REPA
from daybreak.recipe.resolution_aware import ResolutionAware
from daybreak.recipe.sprint import Sprint
from daybreak.recipe.tread import Tread

INGREDIENTS: dict[str, type[Ingredient]] = {
    "tread": Tread,
    "sprint": Sprint,
    "repa": REPA,
    "perceptual": PerceptualLoss,
    "contrastive": ContrastiveFlow,
    "resolution_aware": ResolutionAware,
}


def enabled(cfg) -> list[str]:
    """Names of the ingredients a config switches on, in registry order."""
    return [name for name in INGREDIENTS if getattr(cfg, name).enabled]


def check(cfg) -> None:
    """Each enabled section's own checks, and the pairs that cannot be combined."""
    on = enabled(cfg)
    for name in on:
        getattr(cfg, name).check()
        for other in INGREDIENTS[name].conflicts:
            if other in on:
                raise UserError(f"{name}.enabled and {other}.enabled are alternatives; switch one off")


def build_ingredients(cfg, ctx: BuildContext, inference: bool = False) -> dict[str, Ingredient]:
    """The enabled ingredients by name; with `inference`, only those the sampler needs (routing, fusion)."""
    out: dict[str, Ingredient] = {}
    for name in enabled(cfg):
        cls = INGREDIENTS[name]
        if inference and not cls.at_inference:
            continue
        if cls.needs_pixel_space and not ctx.pixel_space:
            raise UserError(f"{name}.enabled needs a pixel-space model (space.kind=pixels): it reads x̂0 as an image")
        out[name] = cls.from_config(getattr(cfg, name), ctx)
    return out


def block_tokens(cfg, n: int, depth: int) -> list[int]:
    """Image tokens each block sees under the enabled ingredients (the fewest any of them leaves)."""
    counts = [n] * depth
    for name in enabled(cfg):
        own = INGREDIENTS[name].block_tokens(getattr(cfg, name), n, depth)
        counts = [min(a, b) for a, b in zip(counts, own)]
    return counts


__all__ = ["INGREDIENTS", "BuildContext", "Ingredient", "StepTensors", "block_tokens", "build_ingredients",
           "check", "enabled"]
