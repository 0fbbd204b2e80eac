"""The space the transformer denoises in: pixels in [-1, 1] (the speedrun's default) or VAE latents.

Both expose the same four things: `channels`, `downscale` (pixels per model-space pixel), `encode`
(pixels → model space; `keys` name the samples, for a latent cache) and `decode` (model space →
pixels in [-1, 1]). The VAE is frozen and held outside the module tree, so it is neither trained
nor saved in checkpoints.

Three diffusers autoencoder classes give latents, picked by the `_class_name` in the VAE's config.json
(the class its weights were saved as): `AutoencoderKL` (FLUX.1, REPA-E: 16 channels, ×8),
`AutoencoderKLFlux2` (FLUX.2: 32 channels, ×8; its encoder output before the 2×2 patchify and
BatchNorm of diffusers' Flux2 pipeline, which is what PRX's `AutoencoderKL` load of it reads) and
`AutoencoderDC` (DC-AE: 32 channels, ×32, a deterministic encoder). Latents are
`(z − shift) × scale` with the VAE config's `scaling_factor` / `shift_factor`, unless `space.scale` /
`space.shift` set them (FLUX.2's config has none: PRX then uses AutoencoderKL's default 0.18215).

Latents are the mode of the VAE's posterior, not a sample from it, so an image's latent never
changes and can be cached on disk (`space.cache_dir`): a `CachedLatentSpace` reads the latents of
samples it has seen and runs the VAE encoder only on the rest. The loader applies no random
augmentation, so (sample key, bucket size) names one latent exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from daybreak.errors import UserError
from daybreak.io.store import ContentStore
from daybreak.schema import Registry, ranged


class PixelSpace(nn.Module):
    channels = 3
    downscale = 1

    def encode(self, pixels: Tensor, keys: list[str] | None = None) -> Tensor:
        return pixels

    def decode(self, x: Tensor) -> Tensor:
        return x


class LatentSpace(nn.Module):
    """A frozen diffusers autoencoder (see `VAE_CLASSES`) with its scaling and shift factors; `scale` /
    `shift` (None: the VAE config's, else 1 and 0) are `space.scale` / `space.shift`."""

    def __init__(self, vae: nn.Module, scale: float | None = None, shift: float | None = None):
        super().__init__()
        self.frozen = {"vae": vae.eval().requires_grad_(False)}
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.downscale = _downscale(cfg)
        self.scale = float(scale if scale is not None else getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift = float(shift if shift is not None else getattr(cfg, "shift_factor", None) or 0.0)
        # factors the config does not hold are part of what a cached latent means
        self._overrides = (scale, shift) if (scale, shift) != (None, None) else None

    @property
    def vae(self) -> nn.Module:
        return self.frozen["vae"]

    def _apply(self, fn, recurse=True):
        self.vae._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def fingerprint(self) -> str:
        """A digest of the VAE's config and every weight's bytes (dtype included): any other VAE,
        or the same one in another precision, gives other latents and so another cache."""
        h = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        if self._overrides is not None:
            h.update(f"scale={self.scale}|shift={self.shift}".encode())
        for name, t in sorted(self.vae.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode_raw(self, pixels: Tensor) -> Tensor:
        """Scaled latents in the VAE's own dtype: what a latent cache stores, losslessly."""
        out = self.vae.encode(pixels.to(self.vae.dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent  # KL posterior, or DC-AE's latent
        return (z - self.shift) * self.scale

    def encode(self, pixels: Tensor, keys: list[str] | None = None) -> Tensor:
        return self.encode_raw(pixels).float()

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.vae.decode((x / self.scale + self.shift).to(self.vae.dtype)).sample.float()


class LatentCache:
    """`get`/`put` of one sample's latent (C×h×w, the VAE's dtype) by (sample key, bucket size).

    Entries live under `dir/<fingerprint>/`, so latents of different VAEs never mix; one
    safetensors file per (key, size), named by its sha256, under a two-hex-digit fan-out. Writes
    are atomic renames, so ranks and `daybreak cache latents` may fill one cache together. A
    cache directory belongs to one dataset: sample keys are only unique within a source.
    """

    def __init__(self, dir: str | os.PathLike[str], fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.store = ContentStore(Path(dir) / fingerprint)

    @staticmethod
    def _parts(key: str, size: tuple[int, int]) -> tuple[str, str]:
        return key, f"{size[0]}x{size[1]}"

    def __contains__(self, item: tuple[str, tuple[int, int]]) -> bool:
        return self._parts(*item) in self.store

    def get(self, key: str, size: tuple[int, int]) -> Tensor | None:
        stored = self.store.get_tensors(*self._parts(key, size))
        return None if stored is None else stored["latent"]

    def put(self, key: str, size: tuple[int, int], latent: Tensor) -> None:
        self.store.put_tensors({"latent": latent}, *self._parts(key, size))


class CachedLatentSpace(nn.Module):
    """A `LatentSpace` behind a `LatentCache`: `encode(pixels, keys)` reads the latents it holds and
    runs the VAE on the misses only (then stores them). A hit returns exactly the stored tensor, a
    miss exactly the VAE's output; without keys it is the plain latent space. `encoded` counts the
    samples that went through the VAE."""

    def __init__(self, space: LatentSpace, cache: LatentCache) -> None:
        super().__init__()
        self.space, self.cache = space, cache
        self.channels, self.downscale = space.channels, space.downscale
        self.encoded = 0

    @property
    def vae(self) -> nn.Module:
        return self.space.vae

    def encode(self, pixels: Tensor, keys: list[str] | None = None) -> Tensor:
        if keys is None:
            self.encoded += pixels.shape[0]
            return self.space.encode(pixels)
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {pixels.shape[0]} images")
        size = (pixels.shape[-2], pixels.shape[-1])
        found = [self.cache.get(k, size) for k in keys]
        misses = [i for i, latent in enumerate(found) if latent is None]
        if misses:
            fresh = self.space.encode_raw(pixels[misses])
            for row, i in enumerate(misses):
                self.cache.put(keys[i], size, fresh[row])
                found[i] = fresh[row]
            self.encoded += len(misses)
        return torch.stack([latent.to(pixels.device) for latent in found]).float()

    def decode(self, x: Tensor) -> Tensor:
        return self.space.decode(x)


# the diffusers classes a latent space loads, by the `_class_name` of the VAE's config.json
VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC")


def _downscale(config) -> int:
    """Pixels per latent pixel: one ×2 per encoder block after the first (DC-AE names its blocks `encoder_…`)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    blocks = get("block_out_channels") or get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def _vae_path(cfg) -> str:
    if not cfg.vae_path:
        raise UserError("space.kind=latents needs space.vae_path (a diffusers VAE folder or hub id: "
                        f"{', '.join(VAE_CLASSES)})")
    path = cfg.vae_path
    if (path.startswith((".", "/", "~")) or Path(path).exists()) and not Path(path).expanduser().exists():
        raise UserError(f"space.vae_path '{path}' does not exist (download the VAE, e.g. the FLUX VAE, there)")
    return path


def _vae_subfolder(path: str) -> str | None:
    return "vae" if (Path(path) / "vae").is_dir() else None


def _vae_config(path: str) -> tuple[type, dict]:
    """(the diffusers class, its config) of the VAE at `path`, from its config.json alone (no weights)."""
    import diffusers

    try:
        config = diffusers.AutoencoderKL.load_config(path, subfolder=_vae_subfolder(path))
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"space.vae_path '{path}': cannot load a diffusers VAE config ({reason})") from None
    name = config.get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise UserError(f"space.vae_path '{path}' holds a {name}; a latent space takes {', '.join(VAE_CLASSES)}")
    return getattr(diffusers, name), config


def downscale_of(cfg) -> int:
    """Pixels per model-space pixel for the `space` section, from the VAE's config alone (no weights)."""
    if cfg.kind == "pixels":
        return 1
    return _downscale(_vae_config(_vae_path(cfg))[1])


def _pixels(cfg) -> nn.Module:
    if cfg.cache_dir:
        raise UserError("space.cache_dir caches VAE latents: it needs space.kind=latents")
    return PixelSpace()


def _latents(cfg) -> nn.Module:
    path = _vae_path(cfg)
    cls, _ = _vae_config(path)
    try:
        vae = cls.from_pretrained(path, subfolder=_vae_subfolder(path))
    except OSError as e:
        raise UserError(f"space.vae_path '{path}': cannot load an {cls.__name__} ({str(e).splitlines()[0]})") from None
    space = LatentSpace(vae, scale=cfg.scale, shift=cfg.shift)
    return CachedLatentSpace(space, LatentCache(cfg.cache_dir, space.fingerprint())) if cfg.cache_dir else space


SPACES = Registry("space.kind", {"pixels": _pixels, "latents": _latents})


@dataclass
class SpaceConfig:
    """Config section `space`: pixels, or the latents of a frozen VAE (and their cache)."""

    kind: SPACES.choices = "pixels"
    vae_path: str | None = None
    cache_dir: str | None = None
    scale: float | None = ranged(None, gt=0)  # latents = (z - shift) * scale; None: the VAE config's scaling_factor (else 1)
    shift: float | None = None  # None: the VAE config's shift_factor (else 0)


def build_space(cfg: SpaceConfig) -> nn.Module:
    """The space of the `space` config section."""
    return SPACES[cfg.kind](cfg)
