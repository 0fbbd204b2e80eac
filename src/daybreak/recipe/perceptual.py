"""Perceptual losses on the predicted clean image (PixelGen-style, as in the PRX speedrun).

Predicting pixels makes classic perceptual supervision possible: LPIPS for low-level similarity
and a DINO feature loss for semantics, both on the raw x̂0 at every noise level and on the whole
image downsampled (PRX's "pooled full images": no random crops). The target image only provides
features (no gradient); the gradient reaches x̂0. Both frozen networks compute under bf16 autocast
on CUDA and in fp32 on a CPU (`compute_dtype` overrides), the loss itself in fp32.

LPIPS uses the `lpips` package (VGG trunk, its bundled linear calibration layers); the VGG16
backbone comes from a local torchvision state dict, never from the internet.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from daybreak.errors import UserError
from daybreak.recipe.base import BuildContext, Ingredient, IngredientConfig, StepTensors
from daybreak.recipe.teachers import KINDS, SIZES, frozen_autocast, load_vision_teacher, teacher_flops
from daybreak.schema import ranged

# torchvision vgg16.features indices that lpips' five VGG slices hold
_LPIPS_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))
LPIPS_VGG = (14.7e6, 15.5e9 * 2)  # VGG16 conv trunk: parameters, FLOPs of one 224² forward


def load_lpips_vgg(path: str | None, key: str = "perceptual.lpips_vgg_path") -> nn.Module:
    """lpips.LPIPS(net='vgg') with its VGG16 trunk loaded from a torchvision vgg16 state dict file.

    Accepts a full `vgg16().state_dict()` (keys `features.N.*`) or a `vgg16().features` one (`N.*`).
    """
    hint = "download torchvision's vgg16 ImageNet weights (vgg16-397923af.pth) and set it to that file"
    if not path:
        raise UserError(f"{key} is not set: {hint}")
    if not os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"{key}: {path} does not exist; {hint}")
    slice_of = {i: n for n, indices in _LPIPS_SLICES for i in indices}
    try:
        trunk = {}
        for k, v in torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True).items():
            k = k.removeprefix("features.")
            layer = k.split(".")[0]
            if layer.isdigit() and int(layer) in slice_of:
                trunk[f"slice{slice_of[int(layer)]}.{k}"] = v
        import lpips

        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        model.net.load_state_dict(trunk, strict=True)
    except (RuntimeError, AttributeError, pickle.UnpicklingError) as e:
        raise UserError(f"{key}: {path} is not a torchvision vgg16 state dict ({str(e).splitlines()[0]})") from e
    return model


@dataclass
class PerceptualConfig(IngredientConfig):
    """Config section `perceptual` (PRX speedrun: LPIPS 0.1, DINOv2-reg patch features 0.01 at 224²)."""

    lpips_weight: float = ranged(0.1, ge=0)
    lpips_vgg_path: str | None = None
    dino_weight: float = ranged(0.01, ge=0)
    dino_kind: Literal[tuple(KINDS)] = "dinov2-reg"
    dino_path: str | None = None
    dino_resolution: int = ranged(224, ge=1)
    lpips_scale: float = ranged(0.5, gt=0)  # LPIPS on x̂0 resized by this factor (PRX's LPIPS resize_factor)
    pooled: bool = False


class PerceptualLoss(Ingredient):
    """LPIPS (VGG) on x̂0 resized ×`lpips_scale`, and DINO patch-feature cosine loss at `dino_resolution`²."""

    name = "perceptual"
    Config = PerceptualConfig
    needs_pixel_space = True  # the losses read x̂0 as an image

    def __init__(self, c: PerceptualConfig) -> None:
        super().__init__()
        self.lpips_weight, self.dino_weight = c.lpips_weight, c.dino_weight
        self.dino_resolution, self.lpips_scale, self.pooled = c.dino_resolution, c.lpips_scale, c.pooled
        self.compute_dtype: torch.dtype | None = None  # the frozen networks'; None: `frozen_dtype` of the device
        if c.lpips_weight > 0:
            self.freeze("lpips", load_lpips_vgg(c.lpips_vgg_path))
        if c.dino_weight > 0:
            self.freeze("dino", load_vision_teacher(c.dino_kind, c.dino_path, "perceptual.dino_path"))

    @classmethod
    def from_config(cls, c: PerceptualConfig, ctx: BuildContext) -> "PerceptualLoss":
        return cls(c)

    @classmethod
    def pretrained(cls, c: PerceptualConfig) -> dict[str, str | None]:
        return {**({"perceptual.lpips_vgg_path": c.lpips_vgg_path} if c.lpips_weight > 0 else {}),
                **({"perceptual.dino_path": c.dino_path} if c.dino_weight > 0 else {})}

    @classmethod
    def frozen_networks(cls, c: PerceptualConfig, side: int, grid: int) -> dict[str, tuple[float, float]]:
        """Each network on the target and on x̂0, and the input gradient to x̂0 (one more forward's worth): 3
        forwards; DINO at `dino_resolution`², LPIPS on the image resized ×`lpips_scale`."""
        out, kind = {}, c.dino_kind if c.dino_kind in SIZES else "dinov2-reg"  # an unknown kind fails at load
        if c.dino_weight > 0:
            out["dino_loss"] = (3 * teacher_flops(kind, c.dino_resolution), SIZES[kind][0])
        if c.lpips_weight > 0:
            out["lpips"] = (3 * LPIPS_VGG[1] * (side * c.lpips_scale / 224) ** 2, LPIPS_VGG[0])
        return out

    def losses(self, s: StepTensors) -> dict[str, Tensor]:
        pred, target = s.pixels_hat, s.pixels.detach()
        out: dict[str, Tensor] = {}
        if self.lpips_weight > 0:
            out["lpips"] = self.lpips_weight * self.lpips_loss(pred, target)
        if self.dino_weight > 0:
            out["dino"] = self.dino_weight * self.dino_loss(pred, target)
        return out

    def lpips_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean LPIPS over the batch; inputs in [-1, 1], resized bilinearly, unclamped."""
        size = [round(d * self.lpips_scale) for d in pred.shape[-2:]]
        a = F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(target.float(), size=size, mode="bilinear", align_corners=False)
        with frozen_autocast(pred.device, self.compute_dtype):
            distance = self.frozen["lpips"](a, b)
        return distance.float().mean()

    def dino_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean over patch tokens (or the pooled feature) of 1 - cos between DINO features."""
        teacher = self.frozen["dino"]
        teacher.compute_dtype = self.compute_dtype
        size = (self.dino_resolution, self.dino_resolution)

        def prep(x: Tensor) -> Tensor:
            x = ((x.float() + 1) / 2).clamp(0, 1)
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

        with torch.no_grad():
            f_target = teacher(prep(target)).patches
        f_pred = teacher(prep(pred)).patches
        if self.pooled:
            f_pred, f_target = f_pred.mean(1), f_target.mean(1)
        with torch.autocast(pred.device.type, enabled=False):
            return (1 - F.cosine_similarity(f_pred.float(), f_target.float(), dim=-1, eps=1e-8)).mean()
