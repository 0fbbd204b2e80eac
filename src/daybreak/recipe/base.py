"""What every recipe ingredient looks like to the trainer and the sampler.

The training loop knows ingredients only through this class: hooks around the block loop, extra
losses on the step's tensors, and trainable parameters (which go to the AdamW group). Frozen
networks (teachers, LPIPS) live in `self.frozen`, outside the module tree, so they are neither
optimised nor checkpointed, but move with `.to()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from daybreak.model.hooks import BlockHook


@dataclass
class StepTensors:
    """Everything one training step produced that an extra loss may read."""

    x0: Tensor  # clean sample in model space (pixels in [-1, 1] or latents), (B, C, H, W)
    pixels: Tensor  # clean image in [-1, 1], (B, 3, H, W)
    x_t: Tensor  # noised sample in model space
    t: Tensor  # (B,) in [0, 1], 1 = noise
    noise: Tensor
    x0_hat: Tensor  # the model's clean prediction in model space
    pixels_hat: Tensor | None  # x0_hat in pixel space (None when it cannot be decoded cheaply)
    patch_size: int  # model patch size in model space
    pixel_patch: int  # pixels per token side (patch_size × VAE downscale)
    step: int
    extras: dict = field(default_factory=dict)


class Ingredient(nn.Module):
    """Base class: every method has a neutral default, so an ingredient overrides only what it uses."""

    name: str = "ingredient"

    def __init__(self) -> None:
        super().__init__()
        self.frozen: dict[str, nn.Module] = {}

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

