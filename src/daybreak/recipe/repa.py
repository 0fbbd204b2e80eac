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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from daybreak.errors import UserError
from daybreak.model.hooks import TokenState, gather_tokens
from daybreak.recipe.base import BuildContext, Ingredient, StepTensors
from daybreak.recipe.teachers import SIZES, VisionTeacher, load_vision_teacher, teacher_flops


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


PROJECTORS = {"mlp": MLPProjector, "attention": AttentionProjector, "conv": ConvProjector}


@dataclass
class RepaConfig:
    """Config section `repa` (PRX: DINOv3 ViT-L/16 teacher, block 8's output, weight 0.5)."""

    enabled: bool = False
    teacher: str = "dinov3"  # dinov3 | dinov2 | dinov2-reg
    teacher_path: str | None = None
    block_index: int = 7
    weight: float = 0.5
    until_step: int | None = None
    variant: str = "repa"  # repa | irepa
    projector: str | None = None  # mlp | attention | conv (default: mlp for repa, attention for irepa)

    def check(self, depth: int | None = None) -> None:
        if self.variant not in ("repa", "irepa"):
            raise UserError(f"config key 'repa.variant' must be one of repa, irepa; got '{self.variant}'")
        if self.projector is not None and self.projector not in PROJECTORS:
            raise UserError(f"config key 'repa.projector' must be one of {', '.join(PROJECTORS)}; got '{self.projector}'")
        if self.block_index < 0 or (depth is not None and self.block_index >= depth):
            raise UserError(f"config key 'repa.block_index'={self.block_index} must name one of the model's "
                            f"{depth if depth is not None else ''} blocks (0 <= index < depth)")
        if self.weight < 0:
            raise UserError(f"config key 'repa.weight' must be >= 0, got {self.weight}")
        if self.until_step is not None and self.until_step < 0:
            raise UserError(f"config key 'repa.until_step' must be >= 0, got {self.until_step}")


class REPA(Ingredient):
    """Representation alignment of block `block_index`'s tokens with a DINO teacher (REPA / iREPA)."""

    name = "repa"
    Config = RepaConfig

    def __init__(
        self,
        hidden_size: int,
        block_index: int = 7,
        teacher: VisionTeacher | None = None,
        teacher_kind: str = "dinov3",
        teacher_path: str | None = None,
        weight: float = 0.5,
        until_step: int | None = None,
        variant: str = "repa",
        projector: str | None = None,
    ) -> None:
        super().__init__()
        RepaConfig(True, teacher_kind, teacher_path, block_index, weight, until_step, variant, projector).check()
        projector = projector or ("attention" if variant == "irepa" else "mlp")
        if teacher is None:
            teacher = load_vision_teacher(teacher_kind, teacher_path, "repa.teacher_path")
        self.freeze("teacher", teacher)
        self.block_index, self.weight, self.until_step, self.variant = block_index, weight, until_step, variant
        self.projector = PROJECTORS[projector](hidden_size, teacher.width)
        self._capture: CaptureHook | None = None

    @classmethod
    def from_config(cls, c: RepaConfig, ctx: BuildContext) -> "REPA":
        c.check(ctx.depth)
        return cls(hidden_size=ctx.hidden_size, block_index=c.block_index, teacher_kind=c.teacher,
                   teacher_path=c.teacher_path, weight=c.weight, until_step=c.until_step, variant=c.variant,
                   projector=c.projector)

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
