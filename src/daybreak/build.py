"""Factories: the parts a config describes, built the same way for training, inference and tools.

`build_parts(cfg)` gives the transformer, its text tower, its image space and the run's one
denoiser; `build_recipe` the enabled ingredients for them. `Parts` also owns the token geometry
(pixels per token, the token grid of an image), so no other module recomputes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from daybreak.config import Config
from daybreak.data.mix import open_data
from daybreak.data.sources import caption_sample
from daybreak.devices import frozen_dtype, pick_device
from daybreak.diffusion.objective import Denoiser
from daybreak.errors import UserError
from daybreak.model import PRXTransformer, build_transformer, preset
from daybreak.recipe import BuildContext, Ingredient, build_ingredients
from daybreak.space import build_space
from daybreak.text import build_text_encoder


def model_kwargs(cfg: Config, context_dim: int | None = None) -> dict:
    """The preset, the explicit `model.*` keys on top, and the text tower's width as context size."""
    kwargs = dict(preset(cfg.model.preset))
    explicit = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}
    if context_dim is not None and "context_in_dim" not in explicit:
        kwargs["context_in_dim"] = context_dim
    kwargs.update(explicit)
    return kwargs


def pixels_per_token(cfg: Config, space: nn.Module) -> int:
    """`Parts.pixels_per_token` before the transformer exists: the configured patch × the space's downscale."""
    return model_kwargs(cfg)["patch_size"] * space.downscale


def build_denoiser(cfg: Config) -> Denoiser:
    """The run's denoiser: its draws, what the network's output means and the loss on it."""
    return Denoiser(cfg.objective, seed=cfg.seed, global_batch=cfg.train.global_batch, steps=cfg.train.steps)


@dataclass
class Parts:
    """A transformer with its text tower, image space and the run's denoiser (one instance, shared by
    everything built from these parts); `ingredients` are the recipe pieces the sampler needs
    (routers, SPRINT's fusion) or, in training, all enabled ones, by name."""

    transformer: PRXTransformer
    text_encoder: nn.Module
    space: nn.Module
    ingredients: dict[str, Ingredient] = field(default_factory=dict)
    denoiser: Denoiser = field(kw_only=True)

    @property
    def pixels_per_token(self) -> int:
        """The side in pixels of one image token: patch size × the space's downscale (VAE: 8)."""
        return self.transformer.patch_size * self.space.downscale

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of image tokens for an image of `height` × `width` pixels."""
        p = self.pixels_per_token
        if height % p or width % p or height <= 0 or width <= 0:
            raise UserError(f"image size {height}×{width}: both sides must be positive multiples of {p} for this model")
        return height // p, width // p


def demo_tokenizer(cfg: Config) -> tuple:
    """(a new tokenizer for the demo text tower, the number of items whose captions trained it): the
    captions of `text.tokenizer_sample` items of `cfg`'s training data, drawn with the run's seed."""
    from daybreak.text.demo import train_tokenizer

    source = open_data(cfg)[0]  # its named caption columns only (shapes: its built-in captions)
    captions = caption_sample(source, cfg.text.tokenizer_sample, cfg.seed)
    if not captions:
        raise UserError(f"data.path {cfg.data.path!r}: no captions to train the demo text tower's tokenizer on")
    return train_tokenizer(captions, cfg.text.vocab_size), min(len(source), cfg.text.tokenizer_sample)


def build_text(cfg: Config, tokenizer: str | Path | None = None) -> nn.Module:
    """The configured text tower; the demo tower takes its tokenizer from the folder `tokenizer` (a
    checkpoint's or a run's), else a new one is trained on the config's captions (`demo_tokenizer`)."""
    t = cfg.text
    if t.kind == "demo":
        from daybreak.text.demo import load_tokenizer

        tok = load_tokenizer(tokenizer) if tokenizer is not None else demo_tokenizer(cfg)[0]
        return build_text_encoder(t, tokenizer=tok)
    enc = build_text_encoder(t, dtype=text_dtype(cfg))
    if t.cache_dir:
        from daybreak.text.cache import CachedTextEncoder, TextEmbeddingCache

        enc = CachedTextEncoder(enc, TextEmbeddingCache(t.cache_dir, enc.fingerprint, enc.clean))
    return enc


def text_dtype(cfg: Config) -> str:
    """The torch dtype name a frozen pretrained text tower loads in: `text.dtype`, else bf16 when the
    run computes on CUDA and fp32 elsewhere."""
    if cfg.text.dtype is not None:
        return {"bf16": "bfloat16", "fp32": "float32"}[cfg.text.dtype]
    return str(frozen_dtype(pick_device(cfg.train.device))).removeprefix("torch.")


def build_parts(cfg: Config, text_encoder: nn.Module | None = None, space: nn.Module | None = None,
                tokenizer: str | Path | None = None) -> Parts:
    """The parts of `cfg`; a given text tower or space (the bench's stand-ins) replaces the configured one;
    `tokenizer`: the demo text tower's tokenizer folder (see `build_text`)."""
    text = text_encoder if text_encoder is not None else build_text(cfg, tokenizer)
    space = space if space is not None else build_space(cfg.space)
    transformer = build_transformer(**model_kwargs(cfg, context_dim=text.dim))
    if transformer.in_channels != space.channels:
        raise UserError(
            f"model.in_channels={transformer.in_channels} does not match space.kind={cfg.space.kind} "
            f"({space.channels} channels)"
        )
    return Parts(transformer, text, space, denoiser=build_denoiser(cfg))


def build_recipe(cfg: Config, parts: Parts, inference: bool = False) -> dict[str, Ingredient]:
    """The enabled ingredients for `parts`, by name (with `inference`: those the sampler needs)."""
    t = parts.transformer
    ctx = BuildContext(hidden_size=t.hidden_size, depth=t.depth, seed=cfg.seed, denoiser=parts.denoiser,
                       pixel_space=parts.space.downscale == 1 and parts.space.channels == 3)
    return build_ingredients(cfg, ctx, inference=inference)
