"""Perceptual losses with a random-weight VGG trunk and a tiny random DINOv2-with-registers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import daybreak  # noqa: F401  (makes torchvision importable before lpips)
from daybreak.errors import UserError
from daybreak.recipe.base import StepTensors
from daybreak.recipe.perceptual import PerceptualConfig, PerceptualLoss
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel


def step_tensors(pixels: torch.Tensor, pixels_hat: torch.Tensor) -> StepTensors:
    b = pixels.shape[0]
    z = torch.zeros_like(pixels)
    return StepTensors(x0=pixels, pixels=pixels, x_t=z, t=torch.rand(b), noise=z, x0_hat=pixels_hat,
                       grid=(pixels.shape[-2] // 16, pixels.shape[-1] // 16), step=0)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from torchvision.models.vgg import cfgs, make_layers

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(make_layers(cfgs["D"]).state_dict(), d / "vgg16_features.pth")  # a vgg16().features state dict
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=14, image_size=28, num_register_tokens=2)
    Dinov2WithRegistersModel(cfg).save_pretrained(d / "dino")
    return str(d / "vgg16_features.pth"), str(d / "dino")


@pytest.fixture(scope="module")
def loss(paths):
    torch.manual_seed(0)
    return PerceptualLoss(PerceptualConfig(lpips_vgg_path=paths[0], dino_path=paths[1], dino_resolution=28))


def images(seed: int, b: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_identical_images_give_zero_loss(loss):
    x = images(0)
    out = loss.losses(step_tensors(x, x.clone()))
    assert set(out) == {"lpips", "dino"}
    assert out["lpips"].abs().item() < 1e-6
    assert out["dino"].abs().item() < 1e-5
    different = loss.losses(step_tensors(x, images(1)))
    assert different["lpips"].item() > 1e-4 and different["dino"].item() > 1e-4


def test_lpips_symmetric_and_weighted(loss):
    a, b = images(2), images(3)
    ab, ba = loss.lpips_loss(a, b), loss.lpips_loss(b, a)
    torch.testing.assert_close(ab, ba)
    torch.testing.assert_close(loss.losses(step_tensors(b, a))["lpips"], 0.1 * ab)


def test_gradient_reaches_prediction_only(loss):
    target = images(4).requires_grad_(True)
    pred = images(5).requires_grad_(True)
    out = loss.losses(step_tensors(target, pred))
    (out["lpips"] + out["dino"]).backward()
    assert target.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for m in loss.frozen.values() for p in m.parameters())
    assert list(loss.parameters()) == []  # frozen nets sit outside the module tree


def test_dino_loss_matches_hand_computation(paths):
    torch.manual_seed(0)
    pooled = PerceptualLoss(PerceptualConfig(lpips_weight=0, dino_path=paths[1], dino_resolution=28, pooled=True))
    model = Dinov2WithRegistersModel.from_pretrained(paths[1]).eval()
    a, b = images(6), images(7)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(x):
        x = F.interpolate(((x + 1) / 2).clamp(0, 1), size=(28, 28), mode="bilinear", align_corners=False)
        return model(pixel_values=(x - mean) / std).last_hidden_state[:, 3:]  # CLS + 2 registers dropped

    with torch.no_grad():
        fa, fb = feats(a), feats(b)
        assert fa.shape == (2, 4, 32)
        expected = (1 - F.cosine_similarity(fa.mean(1), fb.mean(1), dim=-1)).mean()
        out = pooled.losses(step_tensors(b, a))
    assert set(out) == {"dino"}
    torch.testing.assert_close(out["dino"], 0.01 * expected)


def test_missing_weights_name_the_config_key(paths, tmp_path):
    with pytest.raises(UserError, match="perceptual.lpips_vgg_path"):
        PerceptualLoss(PerceptualConfig(lpips_vgg_path=None, dino_weight=0))
    with pytest.raises(UserError, match="perceptual.lpips_vgg_path"):
        PerceptualLoss(PerceptualConfig(lpips_vgg_path=str(tmp_path / "missing.pth"), dino_weight=0))
    torch.save(torch.zeros(3), tmp_path / "wrong.pth")  # a tensor, not a state dict
    with pytest.raises(UserError, match="perceptual.lpips_vgg_path.*not a torchvision vgg16"):
        PerceptualLoss(PerceptualConfig(lpips_vgg_path=str(tmp_path / "wrong.pth"), dino_weight=0))
    with pytest.raises(UserError, match="perceptual.dino_path"):
        PerceptualLoss(PerceptualConfig(lpips_weight=0, dino_path=str(tmp_path / "no-dino")))
    assert PerceptualLoss(PerceptualConfig(lpips_weight=0, dino_weight=0)).losses(step_tensors(images(0), images(1))) == {}


def test_losses_with_bf16_frozen_networks_equal_fp32_within_bf16_tolerance(loss):
    """The GPU runs LPIPS and the DINO teacher under bf16 autocast: the same losses, to bf16 rounding
    (8-bit mantissa, ~0.4 % per op); and bf16 really ran (the values are not bit-identical)."""
    pred, target = images(5), images(6)
    s = step_tensors(target, pred)
    fp32 = loss.losses(s)
    loss.compute_dtype = torch.bfloat16
    try:
        bf16 = loss.losses(s)
    finally:
        loss.compute_dtype = None
    for k in ("lpips", "dino"):
        assert fp32[k].dtype == bf16[k].dtype == torch.float32
        assert torch.allclose(bf16[k], fp32[k], rtol=3e-2, atol=1e-4), (k, bf16[k], fp32[k])
        assert bf16[k] != fp32[k]
