"""REPA: align an intermediate block's tokens with a frozen vision teacher's patch features.

A hook captures the image-token stream after block `block_index` (block 8 in PRX), a small
trainable projector maps it to the teacher's width, and the loss is −weight · mean cosine
similarity with the teacher's patch tokens of the clean image. The teacher sees the image
downscaled (nearest) by teacher_patch / pixel_patch, so its patch grid is the token grid by
construction. With TREAD routing the stream at the capture point holds only the kept tokens;
their `index` picks the matching teacher features, so routed-out tokens never count.

iREPA (Singh et al. 2025, "What matters for representation alignment") normalises the teacher features spatially, f ← f − mean_D(f)·mean_T(f) then
f / (std_T(f) + 1e-6), and swaps the MLP for a projector that sees spatial context: one
self-attention layer with 2-D RoPE, or a 3×3 convolution on the token grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from daybreak.errors import UserError
from daybreak.model.hooks import TokenState, gather_tokens
from daybreak.recipe.base import BuildContext, Ingredient, IngredientConfig, StepTensors
from daybreak.recipe.teachers import KINDS, SIZES, VisionTeacher, load_vision_teacher, teacher_flops
from daybreak.schema import Registry, ranged


class CaptureHook:
    """Records the token stream (x and grid index) after one block of one forward pass."""

    def __init__(self, block_index: int) -> None:
        self.block_index = block_index
        self.x: Tensor | None = None
        self.index: Tensor | None = None

    def before_block(self, i: int, state: TokenState) -> TokenState:
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        if i == self.block_index:
            self.x, self.index = state.x, state.index
        return state


def teacher_grid_features(teacher: VisionTeacher, images: Tensor, grid: tuple[int, int]) -> Tensor:
    """Teacher patch tokens (B, rows·cols, D) for images in [0, 1] on the model's token grid."""
    size = (grid[0] * teacher.patch_size, grid[1] * teacher.patch_size)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="nearest")
    return teacher(images).patches


def spatial_normalize(f: Tensor) -> Tensor:
    """iREPA's normalisation of teacher features (B, T, D): f − mean_D(f)·mean_T(f), then / (std_T(f) + 1e-6)."""
    f = f - f.mean(dim=2, keepdim=True) * f.mean(dim=1, keepdim=True)
    return f / (f.std(dim=1, keepdim=True) + 1e-6)


class MLPProjector(nn.Sequential):
    """Linear(hidden→D)–SiLU–Linear(D→D)–SiLU–Linear(D→D), per token."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__(nn.Linear(hidden, out), nn.SiLU(), nn.Linear(out, out), nn.SiLU(), nn.Linear(out, out))

    def forward(self, h: Tensor, index: Tensor, grid: tuple[int, int]) -> Tensor:
        return super().forward(h)


class AttentionProjector(nn.Module):
    """One multi-head self-attention layer over the captured tokens, 2-D RoPE on (row, col), then Linear→D."""

    def __init__(self, hidden: int, out: int, heads: int = 4, theta: float = 1e4) -> None:
        super().__init__()
        if hidden % (4 * heads):
            raise UserError(f"repa.projector=attention needs model.hidden_size divisible by {4 * heads}, got {hidden}")
        self.heads, self.theta = heads, theta
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, out)

    def rope(self, index: Tensor, width: int, head_dim: int) -> tuple[Tensor, Tensor]:
        """cos/sin (B, 1, N, head_dim/2): first half of the pairs rotates with the row, second with the column."""
        quarter = head_dim // 4
        freqs = self.theta ** (-torch.arange(quarter, device=index.device, dtype=torch.float32) / quarter)
        rows, cols = (index // width).float(), (index % width).float()
        angles = torch.cat([rows[..., None] * freqs, cols[..., None] * freqs], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()

    def forward(self, h: Tensor, index: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.rope(index, grid[1], d // self.heads)

        def rotate(x: Tensor) -> Tensor:
            a, c = x.float().unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack([a * cos - c * sin, a * sin + c * cos], dim=-1).flatten(-2).to(x.dtype)

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class ConvProjector(nn.Module):
    """3×3 convolution on the token grid. Under routing it cannot see routed-out tokens: the kept
    tokens are scattered into a zero grid, so their neighbours that skipped the blocks read as 0."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(hidden, out, kernel_size=3, padding=1)

    def forward(self, h: Tensor, index: Tensor, grid: tuple[int, int]) -> Tensor:
        b, _, d = h.shape
        full = h.new_zeros(b, grid[0] * grid[1], d).scatter(1, index[..., None].expand(-1, -1, d), h)
        y = self.conv(full.transpose(1, 2).reshape(b, d, *grid)).flatten(2).transpose(1, 2)
        return gather_tokens(y, index)


PROJECTORS = Registry("repa.projector", {"mlp": MLPProjector, "attention": AttentionProjector, "conv": ConvProjector})


@dataclass
class RepaConfig(IngredientConfig):
    """Config section `repa` (PRX: DINOv3 ViT-L/16 teacher, block 8's output, weight 0.5)."""

    teacher: Literal[tuple(KINDS)] = "dinov3"
    teacher_path: str | None = None
    block_index: int = ranged(7, ge=0)
    weight: float = ranged(0.5, ge=0)
    until_step: int | None = ranged(None, ge=0)
    variant: Literal["repa", "irepa"] = "repa"
    projector: PROJECTORS.choices | None = None  # default: mlp for repa, attention for irepa

    def check(self, depth: int | None = None) -> None:
        if depth is not None and self.block_index >= depth:
            raise UserError(f"config key 'repa.block_index'={self.block_index} must name one of the model's "
                            f"{depth} blocks (0 <= index < depth)")


class REPA(Ingredient):
    """Representation alignment of block `block_index`'s tokens with a DINO teacher (REPA / iREPA)."""

    name = "repa"
    Config = RepaConfig

    def __init__(self, c: RepaConfig, hidden_size: int, teacher: VisionTeacher | None = None) -> None:
        """`teacher`: a loaded teacher, else `repa.teacher` from `repa.teacher_path`."""
        super().__init__()
        if teacher is None:
            teacher = load_vision_teacher(c.teacher, c.teacher_path, "repa.teacher_path")
        self.freeze("teacher", teacher)
        self.block_index, self.weight, self.until_step, self.variant = c.block_index, c.weight, c.until_step, c.variant
        projector = c.projector or ("attention" if c.variant == "irepa" else "mlp")
        self.projector = PROJECTORS[projector](hidden_size, teacher.width)
        self._capture: CaptureHook | None = None

    @classmethod
    def from_config(cls, c: RepaConfig, ctx: BuildContext) -> "REPA":
        return cls(c, ctx.hidden_size)

    @classmethod
    def pretrained(cls, c: RepaConfig) -> dict[str, str | None]:
        return {"repa.teacher_path": c.teacher_path}

    @classmethod
    def frozen_networks(cls, c: RepaConfig, side: int, grid: int) -> dict[str, tuple[float, float]]:
        """The teacher, once per image (target only), on the token grid × its patch (`teacher_grid_features`)."""
        if c.teacher not in SIZES:  # refused at load
            return {}
        params, patch, _ = SIZES[c.teacher]
        return {"repa_teacher": (teacher_flops(c.teacher, grid * patch), params)}

    @property
    def teacher(self) -> VisionTeacher:
        return self.frozen["teacher"]

    def active(self, step: int) -> bool:
        return self.until_step is None or step < self.until_step

    def block_hooks(self, step: int) -> list[CaptureHook]:
        self._capture = CaptureHook(self.block_index) if self.active(step) else None
        return [self._capture] if self._capture else []

    def losses(self, s: StepTensors) -> dict[str, Tensor]:
        capture, self._capture = self._capture, None  # drop the captured graph either way
        if capture is None or capture.x is None or not self.active(s.step):
            return {}
        grid = s.grid
        with torch.no_grad():
            f = teacher_grid_features(self.teacher, (s.pixels.float() + 1) / 2, grid)
            if self.variant == "irepa":
                f = spatial_normalize(f)
            f = gather_tokens(f, capture.index)
        h = self.projector(capture.x, capture.index, grid)
        with torch.autocast(h.device.type, enabled=False):
            cos = F.cosine_similarity(h.float(), f.float(), dim=-1, eps=1e-8)
        return {"repa": -self.weight * cos.mean()}
