"""The recipe's ingredients, by name. The trainer, the sampler and the planner see only `Ingredient`s.

Adding an ingredient is one file in this package (its config dataclass, `from_config`, the hooks
or losses it adds) and one line in `IngredientSections`, from which `INGREDIENTS` is read. Its
config section is the registry key, so `tread.enabled=true` switches on `INGREDIENTS["tread"]`; the
order here is the order of the sections in a resolved config and of the hooks around each block.
"""

# no `from __future__ import annotations`: the fields' types are the sections' classes themselves
import dataclasses
from dataclasses import dataclass

from daybreak.errors import UserError
from daybreak.recipe.base import BuildContext, Ingredient, StepTensors
from daybreak.recipe.contrastive import ContrastiveConfig, ContrastiveFlow
from daybreak.recipe.perceptual import PerceptualConfig, PerceptualLoss
from daybreak.recipe.repa import REPA, RepaConfig
from daybreak.recipe.resolution_aware import ResolutionAware, ResolutionAwareConfig
from daybreak.recipe.sprint import Sprint, SprintConfig
from daybreak.recipe.tread import Tread, TreadConfig
from daybreak.schema import check_fields


def _section(ingredient: type[Ingredient]) -> dataclasses.Field:
    return dataclasses.field(default_factory=ingredient.Config, metadata={"ingredient": ingredient})


@dataclass
class IngredientSections:
    """The config sections of the recipe, one per ingredient, named after it (the root `Config` holds them)."""

    tread: TreadConfig = _section(Tread)
    sprint: SprintConfig = _section(Sprint)
    repa: RepaConfig = _section(REPA)
    perceptual: PerceptualConfig = _section(PerceptualLoss)
    contrastive: ContrastiveConfig = _section(ContrastiveFlow)
    resolution_aware: ResolutionAwareConfig = _section(ResolutionAware)


INGREDIENTS: dict[str, type[Ingredient]] = {
    f.name: f.metadata["ingredient"] for f in dataclasses.fields(IngredientSections)
}


def enabled(cfg) -> list[str]:
    """Names of the ingredients a config switches on, in registry order."""
    return [name for name in INGREDIENTS if getattr(cfg, name).enabled]


def check(cfg) -> None:
    """At load: the pairs that cannot be combined, then each enabled section's field checks and own
    checks (those that need the model's depth run in `build_ingredients`, once it is known)."""
    on = enabled(cfg)
    for name in on:
        for other in INGREDIENTS[name].conflicts:
            if other in on:
                raise UserError(f"{name}.enabled and {other}.enabled are alternatives; switch one off")
    for name in on:
        check_fields(getattr(cfg, name), f"{name}.")
        getattr(cfg, name).check()


def build_ingredients(cfg, ctx: BuildContext, inference: bool = False) -> dict[str, Ingredient]:
    """The enabled ingredients by name; with `inference`, only those the sampler needs (routing, fusion).
    Each section's checks against the model's depth (`ctx.depth`) run here, before it builds."""
    out: dict[str, Ingredient] = {}
    for name in enabled(cfg):
        cls = INGREDIENTS[name]
        getattr(cfg, name).check(ctx.depth)
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


__all__ = ["INGREDIENTS", "BuildContext", "Ingredient", "IngredientSections", "StepTensors", "block_tokens",
           "build_ingredients", "check", "enabled"]
