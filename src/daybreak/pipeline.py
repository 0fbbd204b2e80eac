"""The inference side: a transformer, its text tower and its image space inside a sampler loop.

`build_parts(cfg)` is shared with the trainer, so training and inference build the very same
modules from one config. `load_model`, `load_pipeline` and `generate` are the public API (SPEC §1.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn

from daybreak.config import Config, load_config
from daybreak.errors import UserError
from daybreak.flow import FlowObjective
from daybreak.images import to_pil
from daybreak.model import PRXTransformer, build_transformer, preset
from daybreak.recipe import Ingredient, build_routing
from daybreak.sampling import Guidance, sample
from daybreak.space import build_space
from daybreak.text import build_text_encoder
from daybreak.train.checkpoint import check_checkpoint, has_tensors, load_tensors


def model_kwargs(cfg: Config, context_dim: int | None = None) -> dict:
    """The preset, the explicit `model.*` keys on top, and the text tower's width as context size."""
    kwargs = dict(preset(cfg.model.preset))
    explicit = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}
    if context_dim is not None and "context_in_dim" not in explicit:
        kwargs["context_in_dim"] = context_dim
    kwargs.update(explicit)
    return kwargs


@dataclass
class Parts:
    transformer: PRXTransformer
    text_encoder: nn.Module
    space: nn.Module
    ingredients: Sequence[Ingredient] = ()  # what sampling asks for hooks: the routers, when trained with one


def build_text(cfg: Config) -> nn.Module:
    t = cfg.text
    if t.kind == "demo":
        return build_text_encoder("demo", dim=t.dim, max_tokens=t.max_tokens, layers=t.layers)
    enc = build_text_encoder(t.kind, path=t.path, max_tokens=t.max_tokens, hidden_state=t.hidden_state)
    if t.cache_dir:
        from daybreak.text.cache import CachedTextEncoder, TextEmbeddingCache

        enc = CachedTextEncoder(enc, TextEmbeddingCache(t.cache_dir, enc.fingerprint))
    return enc


def build_parts(cfg: Config) -> Parts:
    text = build_text(cfg)
    space = build_space(cfg.space)
    transformer = build_transformer(**model_kwargs(cfg, context_dim=text.dim))
    if transformer.in_channels != space.channels:
        raise UserError(
            f"model.in_channels={transformer.in_channels} does not match space.kind={cfg.space.kind} "
            f"({space.channels} channels)"
        )
    return Parts(transformer, text, space)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    """A trained model ready to sample: `Pipeline(parts, cfg)(prompts, seed=...)` → PIL images."""

    def __init__(self, parts: Parts, cfg: Config, device: torch.device | None = None):
        from daybreak.train.distributed import flush_denormals

        self.cfg = cfg
        self.device = device or default_device()
        flush_denormals(self.device)
        self.transformer = parts.transformer.to(self.device).eval()
        self.text_encoder = parts.text_encoder.to(self.device).eval()
        self.space = parts.space.to(self.device).eval()
        self.ingredients = [ing.to(self.device) for ing in parts.ingredients]

    @torch.no_grad()
    def predictor(self, prompts: list[str], generator: torch.Generator):
        cond = self.text_encoder.encode(prompts)
        uncond = self.text_encoder.encode([""] * len(prompts))
        model = self.transformer
        objective = FlowObjective(self.cfg.objective.prediction, self.cfg.objective.t_clamp)
        dense_hooks = [h for ing in self.ingredients for h in ing.dense_hooks()]
        routers = [ing for ing in self.ingredients if ing.routed_hooks(None) is not None]

        def predict(x_t: torch.Tensor, t: torch.Tensor, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            dense = [b for b in branches if b in ("cond", "uncond")]
            if dense:  # cond and uncond in one batched forward
                emb = torch.cat([(cond if b == "cond" else uncond)[0] for b in dense])
                mask = torch.cat([(cond if b == "cond" else uncond)[1] for b in dense])
                x = x_t.repeat(len(dense), 1, 1, 1)
                pred = model(x, t.repeat(len(dense)), emb, mask, hooks=dense_hooks).float()
                pred = objective.x0_from_output(pred, x, t.repeat(len(dense)))
                out.update(zip(dense, pred.chunk(len(dense))))
            if "routed" in branches:
                if not routers:
                    raise UserError("self-guidance needs a model trained with token routing (tread or sprint)")
                hooks = [h for ing in routers for h in ing.routed_hooks(generator)]
                out["routed"] = objective.x0_from_output(model(x_t, t, cond[0], cond[1], hooks=hooks).float(), x_t, t)
            return out

        return SimpleNamespace(predict=predict)

    @torch.no_grad()
    def __call__(self, prompts: list[str], *, seed: int = 0, steps: int | None = None, cfg: float | None = None,
                 guidance: str | None = None, sampler: str | None = None, size: tuple[int, int] | None = None,
                 seeds: list[int] | None = None, progress: bool = False) -> list[Image.Image]:
        s = self.cfg.sample
        if not prompts:
            raise UserError("give at least one prompt")
        if any(not p or not p.strip() for p in prompts):
            raise UserError("prompts must not be empty")
        h, w = size or (self.cfg.data.image_size, self.cfg.data.image_size)
        patch = self.transformer.patch_size * self.space.downscale
        if h % patch or w % patch or h <= 0 or w <= 0:
            raise UserError(f"--size {h} {w}: both sides must be positive multiples of {patch} for this model")
        seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
        shape = (self.space.channels, h // self.space.downscale, w // self.space.downscale)
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds
        ]).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(seeds[0])
        rule = Guidance(mode=guidance or s.guidance, scale=s.cfg if cfg is None else cfg, self_scale=s.self_scale)
        x0 = sample(self.predictor(list(prompts), g), noise, steps=steps or s.steps, shift=s.shift,
                    guidance=rule, sampler=sampler or s.sampler, t_clamp=self.cfg.objective.t_clamp,
                    progress=progress)
        return to_pil(self.space.decode(x0))


def _load_parts(ckpt: str | Path, ema: bool) -> tuple[Parts, Config]:
    ckpt = check_checkpoint(ckpt)
    cfg = load_config(ckpt / "config.yaml")
    parts = build_parts(cfg)
    parts.ingredients = build_routing(cfg, parts.transformer)
    if parts.ingredients and has_tensors(ckpt, "recipe.safetensors"):  # SPRINT's fusion layer
        recipe = load_tensors(ckpt, "recipe.safetensors")
        for i, ing in enumerate(parts.ingredients):
            ing.load_state_dict({k.split(".", 1)[1]: v for k, v in recipe.items() if k.startswith(f"{i}.")})
    suffix = "_ema" if ema else ""
    parts.transformer.load_state_dict(load_tensors(ckpt, f"transformer{suffix}.safetensors"))
    if any(p.requires_grad for p in parts.text_encoder.parameters()) or has_tensors(ckpt, "text_encoder.safetensors"):
        parts.text_encoder.load_state_dict(load_tensors(ckpt, f"text_encoder{suffix}.safetensors"))
    return parts, cfg


def load_model(ckpt: str | Path, ema: bool = True) -> PRXTransformer:
    """The transformer of a checkpoint in eval mode (EMA weights by default), on the CPU."""
    parts, _ = _load_parts(ckpt, ema)
    return parts.transformer.eval()


def load_pipeline(ckpt: str | Path, ema: bool = True, device: torch.device | None = None) -> Pipeline:
    parts, cfg = _load_parts(ckpt, ema)
    return Pipeline(parts, cfg, device)


def generate(ckpt: str | Path, prompts: list[str] | str, *, seed: int = 0, steps: int | None = None,
             cfg: float | None = None, guidance: str | None = None, sampler: str | None = None,
             size: tuple[int, int] | None = None) -> list[Image.Image]:
    """Prompts → PIL images with the checkpoint's EMA weights; prompt i uses seed + i."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return load_pipeline(ckpt)(prompts, seed=seed, steps=steps, cfg=cfg, guidance=guidance, sampler=sampler, size=size)

