"""The space the transformer denoises in: pixels in [-1, 1] (the speedrun's default) or VAE latents.

Both expose the same four things: `channels`, `downscale` (pixels per model-space pixel), `encode`
(pixels → model space) and `decode` (model space → pixels in [-1, 1]). The VAE is frozen and held
outside the module tree, so it is neither trained nor saved in checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from daybreak.errors import UserError


class PixelSpace(nn.Module):
    channels = 3
    downscale = 1

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels

    def decode(self, x: Tensor) -> Tensor:
        return x


class LatentSpace(nn.Module):
    """Any diffusers AutoencoderKL (FLUX VAE, REPA-E VAE), with its scaling and shift factors."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.frozen = {"vae": vae.eval().requires_grad_(False)}
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)

    @property
    def vae(self) -> nn.Module:
        return self.frozen["vae"]

    def _apply(self, fn, recurse=True):
        self.vae._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return ((dist.mode() - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.vae.decode((x / self.scale + self.shift).to(self.vae.dtype)).sample.float()


def build_space(cfg) -> nn.Module:
    """From the `space` config section."""
    if cfg.kind == "pixels":
        return PixelSpace()
    if not cfg.vae_path:
        raise UserError("space.kind=latents needs space.vae_path (a diffusers AutoencoderKL folder or hub id)")
    from diffusers import AutoencoderKL

    path = cfg.vae_path
    if (path.startswith((".", "/", "~")) or Path(path).exists()) and not Path(path).expanduser().exists():
        raise UserError(f"space.vae_path '{path}' does not exist (download the VAE, e.g. the FLUX VAE, there)")
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae" if (Path(path) / "vae").is_dir() else None)
    except OSError as e:
        raise UserError(f"space.vae_path '{path}': cannot load an AutoencoderKL ({str(e).splitlines()[0]})") from None
    return LatentSpace(vae)
