"""What every recipe ingredient looks like to the trainer, the sampler and the planner.

An ingredient is one switchable piece of the recipe, as in PRX's `prx/algorithm` callbacks. It
owns a config dataclass (`Config`: the keys of its YAML section, named after the ingredient, with
an `enabled` switch and a `check()` that validates them once), builds itself with `from_config`,
and talks to the rest only through the methods below: hooks around the block loop, extra losses
on the step's tensors, trainable parameters (the AdamW group) and how many image tokens each block
sees (for FLOPs). Frozen networks (teachers, LPIPS) live in `self.frozen`, outside the module tree,
so they are neither optimised nor checkpointed, but move with `.to()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from daybreak.diffusion.objective import FlowObjective
from daybreak.model.hooks import BlockHook


@dataclass
class IngredientConfig:
    """What every ingredient's config section holds: its switch. A section's ranges sit on its fields
    (`schema.ranged`), checked when the config loads; `check` holds what they cannot say, and runs at
    load (`depth` None) and again once the model's depth is known (`build_ingredients`)."""

    enabled: bool = False

    def check(self, depth: int | None = None) -> None:
        """Checks across fields, or against a model of `depth` blocks; none by default."""


@dataclass
class BuildContext:
    """What an ingredient may need to know about the run it joins."""

    hidden_size: int
    depth: int
    seed: int
    objective: FlowObjective  # the run's denoiser (prediction type, t clamp)
    pixel_space: bool  # the model denoises pixels (x̂0 is an image) rather than latents


@dataclass
class StepTensors:
    """Everything one training micro batch produced that an extra loss may read."""

    x0: Tensor  # clean sample in model space (pixels in [-1, 1] or latents), (B, C, H, W)
    pixels: Tensor  # clean image in [-1, 1], (B, 3, H, W)
    x_t: Tensor  # noised sample in model space
    t: Tensor  # (B,) in [0, 1], 1 = noise
    noise: Tensor
    x0_hat: Tensor  # the model's clean prediction in model space
    grid: tuple[int, int]  # (rows, cols) of the image-token grid
    step: int

    @property
    def pixels_hat(self) -> Tensor:
        """x̂0 as an image; only pixel-space models have one (`needs_pixel_space` ingredients)."""
        if self.x0_hat.shape[1] != self.pixels.shape[1] or self.x0_hat.shape[-2:] != self.pixels.shape[-2:]:
            raise RuntimeError("pixels_hat needs a pixel-space model; declare needs_pixel_space")
        return self.x0_hat


class Ingredient(nn.Module):
    """Base class: every method has a neutral default, so an ingredient overrides only what it uses."""

    name: ClassVar[str] = "ingredient"
    Config: ClassVar[type]  # its config section's dataclass
    at_inference: ClassVar[bool] = False  # part of the trained architecture / needed by the sampler
    needs_pixel_space: ClassVar[bool] = False
    conflicts: ClassVar[tuple[str, ...]] = ()  # ingredients it cannot be combined with

    def __init__(self) -> None:
        super().__init__()
        self.frozen: dict[str, nn.Module] = {}

    @classmethod
    def from_config(cls, c, ctx: BuildContext) -> "Ingredient":
        raise NotImplementedError

    @staticmethod
    def block_tokens(c, n: int, depth: int) -> list[int]:
        """Image tokens each of the `depth` blocks sees when the model has `n` (for FLOPs and memory)."""
        return [n] * depth

    def active(self, step: int) -> bool:
        return True

    def block_hooks(self, step: int) -> list[BlockHook]:
        """Fresh hooks for one training forward pass (routing, feature capture)."""
        return []

    def dense_hooks(self) -> list[BlockHook]:
        """Hooks for the inference forward (SPRINT's fusion belongs to the trained architecture)."""
        return []

    def routed_hooks(self, generator) -> list[BlockHook] | None:
        """Hooks for self-guidance's routed branch; None when the ingredient does not route tokens."""
        return None

    def losses(self, s: StepTensors) -> dict[str, Tensor]:
        """Extra loss terms, already weighted; the trainer adds them to the flow loss."""
        return {}

    def _apply(self, fn, recurse=True):  # moves frozen networks along with .to()/.cuda()
        for m in self.frozen.values():
            m._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def freeze(self, name: str, module: nn.Module) -> nn.Module:
        module.eval().requires_grad_(False)
        self.frozen[name] = module
        return module


def check_span(section: str, start: int, end: int, depth: int | None = None) -> None:
    """A block span start..end (inclusive) that fits a model of `depth` blocks."""
    from daybreak.errors import UserError

    if start < 0 or end < start:
        raise UserError(f"config keys '{section}.start'..'{section}.end' need 0 <= start <= end, got {start}..{end}")
    if depth is not None and end >= depth:
        raise UserError(f"config key '{section}.end'={end} does not fit a model of depth {depth} (end < depth)")
