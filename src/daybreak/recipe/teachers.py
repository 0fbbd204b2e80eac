"""Frozen DINO vision teachers behind one small interface.

REPA and the DINO perceptual loss both need "patch features of an image batch", but DINOv2,
DINOv2-with-registers and DINOv3 differ in class, prefix tokens (CLS + registers) and patch size.
`VisionTeacher` hides that: it takes images in [0, 1], applies ImageNet normalisation, runs
under bf16 autocast on CUDA (fp32 weights, tensor-core matmuls; fp32 on a CPU, see
`daybreak.devices.frozen_dtype`) whatever the caller's autocast, and returns fp32 patch tokens
only. Its parameters are frozen, but the forward stays differentiable in the input (the DINO
perceptual loss backpropagates through it); callers that want a target wrap it in `torch.no_grad()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from daybreak.devices import frozen_dtype
from daybreak.errors import UserError
from daybreak.images import IMAGENET_MEAN, IMAGENET_STD


# kind -> (transformers class name, config model_type, a checkpoint to suggest)
KINDS = {
    "dinov2": ("Dinov2Model", "dinov2", "facebook/dinov2-base"),
    "dinov2-reg": ("Dinov2WithRegistersModel", "dinov2_with_registers", "facebook/dinov2-with-registers-base"),
    "dinov3": ("DINOv3ViTModel", "dinov3_vit", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
}


# kind -> (parameters, patch size, prefix tokens: CLS + registers), from the model cards: the planner's
# forward cost, 2·parameters·tokens with tokens = patches + prefix (`teacher_flops`)
SIZES = {"dinov3": (304e6, 16, 5), "dinov2": (86e6, 14, 1), "dinov2-reg": (86e6, 14, 5)}


def teacher_tokens(kind: str, side: int) -> int:
    """Tokens a ViT teacher of `kind` runs on for a `side`² input: patches + prefix."""
    _, patch, prefix = SIZES[kind]
    return (side // patch) ** 2 + prefix


def teacher_flops(kind: str, side: int) -> float:
    """FLOPs of one forward of a `kind` teacher on a `side`² image: 2·parameters·tokens."""
    return 2 * SIZES[kind][0] * teacher_tokens(kind, side)


@dataclass
class TeacherFeatures:
    patches: Tensor  # (B, T, D) patch tokens, row-major over `grid`
    pooled: Tensor  # (B, D) the model's pooled (CLS) feature
    grid: tuple[int, int]  # (rows, cols) of the patch grid


class VisionTeacher(nn.Module):
    """A frozen DINO backbone returning patch tokens for images in [0, 1]."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype  # None: `frozen_dtype` of the input's device
        self.model = model.float().eval().requires_grad_(False)
        cfg = model.config
        self.patch_size: int = cfg.patch_size
        self.width: int = cfg.hidden_size
        self.num_prefix: int = 1 + getattr(cfg, "num_register_tokens", 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "VisionTeacher":
        return super().train(False)  # always inference mode

    def forward(self, images: Tensor) -> TeacherFeatures:
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = (images.float() - self.mean) / self.std
        with frozen_autocast(images.device, self.compute_dtype):
            out = self.model(pixel_values=x)
        return TeacherFeatures(out.last_hidden_state[:, self.num_prefix :].float(), out.pooler_output.float(), grid)


def frozen_autocast(device: torch.device, dtype: torch.dtype | None = None):
    """The autocast a frozen network runs under on `device`: `dtype` (default `frozen_dtype(device)`),
    replacing the caller's; fp32 means autocast off."""
    dtype = dtype or frozen_dtype(device)
    return torch.autocast(device.type, dtype=dtype if dtype != torch.float32 else None, enabled=dtype != torch.float32)


def load_vision_teacher(kind: str, path: str | None, key: str) -> VisionTeacher:
    """Load a DINO teacher with transformers' `from_pretrained` (a local folder or a hub id)."""
    if kind not in KINDS:
        raise UserError(f"unknown teacher kind {kind!r} for {key}: choose one of {', '.join(KINDS)}")
    class_name, model_type, suggestion = KINDS[kind]
    hint = f"download {suggestion} (or another {kind} checkpoint) and set {key} to its folder"
    if not path:
        raise UserError(f"{key} is not set: {hint}")
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1  # a hub id is "org/name"
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"{key}: {path} does not exist; {hint}")
    import transformers

    path = os.path.expanduser(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        if config.model_type != model_type:
            raise UserError(f"{key}: {path} holds a {config.model_type} model, not {kind} ({model_type})")
        model = getattr(transformers, class_name).from_pretrained(path, config=config, dtype=torch.float32)
    except OSError as e:
        raise UserError(f"{key}: cannot load {kind} weights from {path} ({str(e).splitlines()[0]}); {hint}") from e
    return VisionTeacher(model)
