"""What every recipe ingredient looks like to the trainer, the sampler and the planner.

An ingredient is one switchable piece of the recipe, as in PRX's `prx/algorithm` callbacks. It
owns a config dataclass (`Config`: the keys of its YAML section, named after the ingredient, with
an `enabled` switch and a `check()` that validates them once), builds itself with `from_config`,
and talks to the rest only through the methods below: hooks around the block loop, extra losses
on the step's tensors, trainable parameters (the AdamW group) and how many image tokens each block
sees (for FLOPs). What the tools need to know without building it is on the class: the pretrained
weights it loads (`daybreak ablate --check`), its frozen networks' FLOPs and size (`daybreak plan`), and
whether and how it goes into diffusers' transformer (`daybreak export` / `import`, `init_from`). Frozen networks (teachers, LPIPS) live in `self.frozen`, outside the module tree,
so they are neither optimised nor checkpointed, but move with `.to()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from daybreak.diffusion.objective import Denoiser
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
    denoiser: Denoiser  # the run's one denoiser (prediction type, t clamp)
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

    # The contract the tools read from the class, so that `daybreak ablate --check`, `daybreak plan` and
    # `daybreak export` / `import` loop over the enabled ingredients and name none of them.

    @classmethod
    def pretrained(cls, c) -> dict[str, str | None]:
        """{config key: path} of the pretrained weights the enabled section `c` loads (`ablate --check`)."""
        return {}

    @classmethod
    def frozen_networks(cls, c, side: int, grid: int) -> dict[str, tuple[float, float]]:
        """{term: (FLOPs per training image of side² pixels on a grid² token grid, parameters)} of the
        frozen networks the enabled section `c` runs (`daybreak plan`: step time and resident memory)."""
        return {}

    export_drop_warning: ClassVar[str | None] = None  # what `export(drop_sprint_fusion=True)` leaves out, if it may

    @classmethod
    def export_refusal(cls, c, config: dict) -> str | None:
        """Why diffusers' transformer (its `config`) cannot hold this trained ingredient, completing
        "CHECKPOINT is ..."; None when it can, or when the ingredient is training-only (nothing to export)."""
        return None

    @classmethod
    def to_diffusers(cls, c, weights: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
        """(transformer config entries, transformer weights) from the ingredient's trained `weights`
        (its keys of recipe*.safetensors, without the `name.` prefix); called when `export_refusal` is None."""
        return {}, {}

    diffusers_part: ClassVar[str] = ""  # what `from_diffusers` takes from a diffusers transformer, in words

    @classmethod
    def from_diffusers(cls, kwargs: dict, state: dict[str, Tensor]) -> tuple[dict | None, dict[str, Tensor]]:
        """The inverse, for `daybreak import` and `init_from`: pops the ingredient's entries from a diffusers
        transformer's `kwargs` and `state`; returns its config section and weights, or (None, {})."""
        return None, {}

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
