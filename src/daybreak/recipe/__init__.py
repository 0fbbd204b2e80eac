"""The recipe's ingredients, built from their config sections. The trainer sees only `Ingredient`s.

Adding an ingredient: one file in this package, one config section, one line below.
"""

from __future__ import annotations

from daybreak.config import Config
from daybreak.errors import UserError
from daybreak.recipe.base import Ingredient, StepTensors


def build_routing(cfg: Config, transformer) -> list[Ingredient]:
    """The token routers (TREAD or SPRINT): the only ingredients inference needs. They come first in
    `build_ingredients`, so a checkpoint's `recipe.safetensors` keys for them start at index 0."""
    out: list[Ingredient] = []
    if cfg.tread.enabled:
        from daybreak.recipe.tread import Tread

        t = cfg.tread
        out.append(Tread(depth=transformer.depth, fraction=t.fraction, start=t.start, end=t.end, seed=cfg.seed))
    if cfg.sprint.enabled:
        from daybreak.recipe.sprint import Sprint

        s = cfg.sprint
        out.append(Sprint(hidden_size=transformer.hidden_size, depth=transformer.depth, drop_ratio=s.drop_ratio,
                          start=s.start, end=s.end, seed=cfg.seed))
    return out


def build_ingredients(cfg: Config, transformer) -> list[Ingredient]:
    out = build_routing(cfg, transformer)
    if cfg.repa.enabled:
        from daybreak.recipe.repa import REPA
        from daybreak.recipe.teachers import load_vision_teacher

        r = cfg.repa
        if not r.teacher_path:
            raise UserError(f"repa.enabled needs repa.teacher_path (a {r.teacher} checkpoint folder or hub id)")
        if r.block_index >= transformer.depth:
            raise UserError(f"repa.block_index={r.block_index} but the model has {transformer.depth} blocks")
        teacher = load_vision_teacher(r.teacher, r.teacher_path, key="repa.teacher_path")
        out.append(REPA(hidden_size=transformer.hidden_size, block_index=r.block_index, teacher=teacher,
                        weight=r.weight, until_step=r.until_step, variant=r.variant, projector=r.projector))
    if cfg.perceptual.enabled:
        from daybreak.recipe.perceptual import PerceptualLoss

        p = cfg.perceptual
        out.append(PerceptualLoss(lpips_weight=p.lpips_weight, dino_weight=p.dino_weight,
                                  lpips_vgg_path=p.lpips_vgg_path, dino_kind=p.dino_kind, dino_path=p.dino_path,
                                  dino_resolution=p.dino_resolution, pooled=p.pooled))
    if cfg.contrastive.enabled:
        from daybreak.recipe.contrastive import ContrastiveFlow

        out.append(ContrastiveFlow(weight=cfg.contrastive.weight))
    return out


__all__ = ["Ingredient", "StepTensors", "build_ingredients", "build_routing"]
