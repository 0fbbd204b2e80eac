"""REPA / iREPA and the vision-teacher wrapper, with tiny random DINOv2 / DINOv3 models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import daybreak  # noqa: F401  (makes torchvision importable before transformers' vision models)
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model.hooks import TokenState, run_after
from daybreak.recipe.base import StepTensors
from daybreak.recipe.repa import (REPA, RepaConfig, AttentionProjector, ConvProjector, spatial_normalize,
                                  teacher_grid_features)
from daybreak.recipe.teachers import VisionTeacher, load_vision_teacher
from transformers import DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model

WIDTH = 32


@pytest.fixture(scope="module")
def dinov3() -> VisionTeacher:
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=16, image_size=32, num_register_tokens=2)
    return VisionTeacher(DINOv3ViTModel(cfg))


@pytest.fixture(scope="module")
def dinov2() -> VisionTeacher:
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28)
    return VisionTeacher(Dinov2Model(cfg))


class Scale(nn.Module):
    """A stand-in projector: proj(h) = 3·h, so the cosine is the one between h and f."""

    def forward(self, h, index, grid):
        return 3 * h


def step(pixels: torch.Tensor, pixel_patch: int = 16, n: int = 0) -> StepTensors:
    z = torch.zeros_like(pixels)
    return StepTensors(x0=pixels, pixels=pixels, x_t=z, t=torch.rand(len(pixels)), noise=z, x0_hat=z,
                       grid=(pixels.shape[-2] // pixel_patch, pixels.shape[-1] // pixel_patch), step=n)


def capture(repa: REPA, n: int, x: torch.Tensor, index: torch.Tensor) -> None:
    """Run the hooks of one forward over 10 blocks, the stream being `x` at block `block_index`."""
    hooks = repa.block_hooks(n)
    for i in range(10):
        stream = x if i == repa.block_index else torch.randn_like(x)
        run_after(hooks, i, TokenState(x=stream, rope=torch.zeros(*index.shape, 2), index=index))


def pixels(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_teacher_strips_prefix_and_normalises(dinov3):
    img = (pixels(32, 48) + 1) / 2
    out = dinov3(img)
    assert dinov3.num_prefix == 3 and dinov3.patch_size == 16 and dinov3.width == WIDTH
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        ref = dinov3.model(pixel_values=(img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    assert out.grid == (2, 3) and out.patches.shape == (1, 6, WIDTH) and out.pooled.shape == (1, WIDTH)
    torch.testing.assert_close(out.patches, ref.last_hidden_state[:, 3:])


def test_load_vision_teacher_roundtrip_and_errors(tmp_path, dinov2):
    dinov2.model.save_pretrained(tmp_path / "d2")
    loaded = load_vision_teacher("dinov2", str(tmp_path / "d2"), "repa.teacher_path")
    assert loaded.num_prefix == 1 and loaded.patch_size == 14 and not loaded.model.training
    assert all(not p.requires_grad for p in loaded.parameters())
    with pytest.raises(UserError, match="repa.teacher_path"):
        load_vision_teacher("dinov3", str(tmp_path / "nope"), "repa.teacher_path")
    with pytest.raises(UserError, match="repa.teacher_path.*dinov3"):
        load_vision_teacher("dinov3", str(tmp_path / "d2"), "repa.teacher_path")
    with pytest.raises(UserError, match="repa.teacher_path"):
        REPA(RepaConfig(teacher_path=None), WIDTH)


def test_cosine_loss_by_hand_on_two_tokens(dinov3):
    repa = REPA(RepaConfig(weight=0.5), WIDTH, teacher=dinov3)
    repa.projector = Scale()
    x = pixels(16, 32)  # a 1×2 token grid at pixel_patch 16 = teacher patch
    f = dinov3((x + 1) / 2).patches.detach()
    index = torch.tensor([[0, 1]])
    capture(repa, 0, f * torch.tensor([2.0, 5.0]).view(1, 2, 1), index)  # proj ∝ teacher feature
    torch.testing.assert_close(repa.losses(step(x))["repa"], torch.tensor(-0.5))
    h = torch.randn(1, 2, WIDTH)
    capture(repa, 0, h, index)
    by_hand = [(h[0, i] @ f[0, i]) / (h[0, i].norm() * f[0, i].norm()) for i in range(2)]
    torch.testing.assert_close(repa.losses(step(x))["repa"], -0.5 * (by_hand[0] + by_hand[1]) / 2)


def test_only_kept_tokens_count(dinov3):
    repa = REPA(RepaConfig(weight=1.0), WIDTH, teacher=dinov3)
    repa.projector = Scale()
    x = pixels(32, 32)  # 2×2 grid
    f = dinov3((x + 1) / 2).patches.detach()
    kept = torch.tensor([[3, 0]])
    capture(repa, 0, f[:, [3, 0]], kept)
    torch.testing.assert_close(repa.losses(step(x))["repa"], torch.tensor(-1.0))
    capture(repa, 0, f[:, [0, 3]], kept)  # right features at the wrong grid positions
    assert repa.losses(step(x))["repa"] > -0.99


def test_until_step_turns_it_off(dinov3):
    repa = REPA(RepaConfig(until_step=5), WIDTH, teacher=dinov3)
    x = pixels(32, 32)
    assert repa.active(4) and not repa.active(5)
    assert repa.block_hooks(5) == []
    capture(repa, 4, torch.randn(1, 4, WIDTH), torch.arange(4)[None])
    assert repa.losses(step(x, n=5)) == {}
    capture(repa, 4, torch.randn(1, 4, WIDTH), torch.arange(4)[None])
    assert "repa" in repa.losses(step(x, n=4))


def test_teacher_grid_matches_token_grid(dinov2, dinov3):
    img = (pixels(64, 96) + 1) / 2  # pixel_patch 32: a 2×3 token grid
    feats = teacher_grid_features(dinov2, img, (2, 3))  # patch 14: image resized (nearest) to 28×42
    assert feats.shape == (1, 6, WIDTH)
    torch.testing.assert_close(feats, dinov2(F.interpolate(img, size=(28, 42), mode="nearest")).patches)
    img16 = (pixels(32, 48) + 1) / 2  # pixel_patch 16 = teacher patch: the image is used as is
    torch.testing.assert_close(teacher_grid_features(dinov3, img16, (2, 3)), dinov3(img16).patches)


def test_gradient_reaches_projector_not_teacher(dinov3):
    repa = REPA(RepaConfig(), 24, teacher=dinov3)
    x = pixels(32, 32).requires_grad_(True)
    h = torch.randn(1, 4, 24, requires_grad=True)
    capture(repa, 0, h, torch.arange(4)[None])
    repa.losses(step(x))["repa"].backward()
    assert x.grad is None and all(p.grad is None for p in dinov3.parameters())
    assert h.grad.abs().sum() > 0 and all(p.grad is not None for p in repa.parameters())
    assert not any(n.startswith("teacher") for n, _ in repa.named_parameters())


def test_bf16_autocast_loss_is_finite(dinov3):
    torch.manual_seed(0)
    repa = REPA(RepaConfig(), 16, teacher=dinov3)
    x = pixels(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        capture(repa, 0, torch.randn(1, 1, 16), torch.zeros(1, 1, dtype=torch.long))
        loss = repa.losses(step(x))["repa"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_irepa_spatial_normalisation_by_hand():
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # B=1, T=2, D=2
    # mean_D = (1.5, 3.5) per token, mean_T = (2, 3) per channel -> f - outer = [[-2, -2.5], [-4, -6.5]]
    # std over tokens (unbiased): sqrt(2) and 2·sqrt(2)
    s2 = math.sqrt(2) + 1e-6
    s8 = 2 * math.sqrt(2) + 1e-6
    expected = torch.tensor([[[-2 / s2, -2.5 / s8], [-4 / s2, -6.5 / s8]]])
    torch.testing.assert_close(spatial_normalize(f), expected)


def test_irepa_defaults_to_attention_projector(dinov3):
    repa = REPA(RepaConfig(variant="irepa"), WIDTH, teacher=dinov3)
    assert isinstance(repa.projector, AttentionProjector)
    capture(repa, 0, torch.randn(2, 3, WIDTH), torch.tensor([[0, 2, 3], [1, 2, 3]]))
    loss = repa.losses(step(pixels(32, 32).expand(2, -1, -1, -1)))["repa"]
    assert torch.isfinite(loss) and -0.5 <= loss.item() <= 0.5
    with pytest.raises(UserError, match="repa.variant"):  # checked where the config loads
        load_config("tiny", ["repa.enabled=true", "repa.variant=nope"])


def test_attention_projector_is_permutation_equivariant_and_position_aware():
    torch.manual_seed(0)
    proj = AttentionProjector(16, 8)
    h, index = torch.randn(1, 3, 16), torch.tensor([[0, 4, 5]])
    out = proj(h, index, (3, 3))
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(proj(h[:, perm], index[:, perm], (3, 3)), out[:, perm])
    assert not torch.allclose(proj(h, torch.tensor([[0, 1, 8]]), (3, 3)), out)


def test_conv_projector_sees_zeros_for_routed_out_tokens():
    torch.manual_seed(0)
    proj = ConvProjector(4, 5)
    h, index = torch.randn(1, 2, 4), torch.tensor([[4, 0]])  # grid 3×3, centre and top-left kept
    full = torch.zeros(1, 9, 4)
    full[0, 4], full[0, 0] = h[0, 0], h[0, 1]
    ref = proj.conv(full.transpose(1, 2).reshape(1, 4, 3, 3)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(h, index, (3, 3)), ref[:, [4, 0]])


def test_repa_loss_with_a_bf16_teacher_equals_fp32_within_bf16_tolerance(dinov2):
    """REPA's target features from the teacher under bf16 autocast (the GPU's path) give the fp32 loss
    to bf16 rounding."""
    repa = REPA(RepaConfig(block_index=0), 16, teacher=dinov2)
    px = pixels(28, 28)
    s = step(px, pixel_patch=14)
    x, index = torch.randn(1, 4, 16), torch.arange(4)[None]
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        dinov2.compute_dtype = dtype
        capture(repa, 0, x, index)
        values[dtype] = repa.losses(s)["repa"]
    dinov2.compute_dtype = None
    assert torch.allclose(values[torch.bfloat16], values[torch.float32], rtol=3e-2, atol=1e-3)
    assert values[torch.bfloat16] != values[torch.float32]
