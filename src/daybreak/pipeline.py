"""The inference side: a transformer, its text tower and its image space inside a sampler loop.

Inference only: the parts come from `daybreak.build` (the same factories as training) and the
weights from a checkpoint directory. `load_model`, `load_pipeline` and `generate` are the public API.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn

from daybreak.build import Parts, build_parts, build_recipe
from daybreak.config import Config, load_config
from daybreak.devices import default_device, flush_denormals
from daybreak.diffusion.sampling import Guidance, sample
from daybreak.errors import UserError
from daybreak.images import to_pil
from daybreak.io.checkpoint import check_checkpoint, has_tensors, load_tensors
from daybreak.model import PRXTransformer
from daybreak.recipe import INGREDIENTS, Ingredient


class Pipeline:
    """A trained model ready to sample: `Pipeline(parts, cfg)(prompts, seed=...)` → PIL images."""

    def __init__(self, parts: Parts, cfg: Config, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or default_device()
        flush_denormals(self.device)
        self.transformer = parts.transformer.to(self.device).eval()
        self.text_encoder = parts.text_encoder.to(self.device).eval()
        self.space = parts.space.to(self.device).eval()
        self.ingredients = [ing.to(self.device) for ing in parts.ingredients.values()]
        self.parts = parts

    @torch.no_grad()
    def predictor(self, prompts: list[str], generator: torch.Generator, redraw: bool = False):
        """The `Predictor` of one generation. Self-guidance's routed branch keeps one token subset for the
        whole generation, as PRX does (prx/algorithm/tread.py reseeds its router with the same seed at
        every routed forward); with `redraw` (`sample.self_redraw`) each step draws a new subset."""
        routing_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        cond = self.text_encoder.encode(prompts)
        uncond = self.text_encoder.encode([""] * len(prompts))
        model = self.transformer
        denoiser = self.parts.denoiser
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
                pred = denoiser.x0_from_output(pred, x, t.repeat(len(dense)))
                out.update(zip(dense, pred.chunk(len(dense))))
            if "routed" in branches:
                if not routers:
                    routing = " or ".join(n for n, c in INGREDIENTS.items() if c.routed_hooks is not Ingredient.routed_hooks)
                    raise UserError(f"self-guidance needs a model trained with token routing ({routing})")
                g = generator if redraw else torch.Generator(device=generator.device).manual_seed(routing_seed)
                # the routers' routed forward, with every other ingredient's inference hooks
                hooks = [h for ing in self.ingredients
                         for h in (ing.routed_hooks(g) if ing in routers else ing.dense_hooks())]
                out["routed"] = denoiser.x0_from_output(model(x_t, t, cond[0], cond[1], hooks=hooks).float(), x_t, t)
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
        self.parts.token_grid(h, w)  # both sides fit the model's patches
        seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
        shape = (self.space.channels, h // self.space.downscale, w // self.space.downscale)
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds
        ]).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(seeds[0])
        rule = Guidance(mode=guidance or s.guidance, scale=s.cfg if cfg is None else cfg, self_scale=s.self_scale)
        x0 = sample(self.predictor(list(prompts), g, redraw=s.self_redraw), noise, steps=steps or s.steps,
                    shift=s.shift, guidance=rule, denoiser=self.parts.denoiser, sampler=sampler or s.sampler,
                    progress=progress)
        return to_pil(self.space.decode(x0))


def _load_parts(ckpt: str | Path, ema: bool) -> tuple[Parts, Config]:
    """A checkpoint's inference parts: EMA weights when asked for and the run kept an EMA (`ema.enabled`),
    else the raw ones; SPRINT's fusion and mask token from the same set as the blocks."""
    ckpt = check_checkpoint(ckpt)
    cfg = load_config(ckpt / "config.yaml")
    parts = build_parts(cfg, tokenizer=ckpt / "tokenizer" if cfg.text.kind == "demo" else None)
    parts.ingredients = build_recipe(cfg, parts, inference=True)
    suffix = "_ema" if ema and cfg.ema.enabled else ""
    if parts.ingredients and has_tensors(ckpt, "recipe.safetensors"):  # SPRINT's fusion layer
        averaged = f"recipe{suffix}.safetensors"  # none when no trained part runs at inference
        recipe = load_tensors(ckpt, averaged if has_tensors(ckpt, averaged) else "recipe.safetensors")
        for name, ing in parts.ingredients.items():
            ing.load_state_dict({k[len(name) + 1:]: v for k, v in recipe.items() if k.startswith(f"{name}.")})
    parts.transformer.load_state_dict(load_tensors(ckpt, f"transformer{suffix}.safetensors"))
    if any(p.requires_grad for p in parts.text_encoder.parameters()) or has_tensors(ckpt, "text_encoder.safetensors"):
        parts.text_encoder.load_state_dict(load_tensors(ckpt, f"text_encoder{suffix}.safetensors"))
    return parts, cfg


class FusedTransformer(nn.Module):
    """A transformer with the trained recipe parts that belong to its forward (SPRINT's fusion layer and
    mask token, Park et al. 2025; the resolution-aware embedder): `forward` takes the PRX arguments and
    runs those parts' dense hooks."""

    def __init__(self, transformer: PRXTransformer, ingredients: dict[str, nn.Module]) -> None:
        super().__init__()
        self.transformer, self.recipe = transformer, nn.ModuleDict(ingredients)
        self.config = transformer.config

    def forward(self, hidden_states, timestep, encoder_hidden_states, attention_mask=None, hooks=()):
        dense = [h for ing in self.recipe.values() for h in ing.dense_hooks()]
        return self.transformer(hidden_states, timestep, encoder_hidden_states, attention_mask, hooks=[*dense, *hooks])


def load_model(ckpt: str | Path, ema: bool = True) -> nn.Module:
    """The model of a checkpoint in eval mode (EMA weights by default, raw ones for a run without EMA), on
    the CPU: the transformer, wrapped with SPRINT's fusion or the resolution embedder when it was trained with them."""
    parts, _ = _load_parts(ckpt, ema)
    fused = {n: ing for n, ing in parts.ingredients.items() if ing.dense_hooks()}
    return (FusedTransformer(parts.transformer, fused) if fused else parts.transformer).eval()


def load_pipeline(ckpt: str | Path, ema: bool = True, device: torch.device | None = None) -> Pipeline:
    parts, cfg = _load_parts(ckpt, ema)
    return Pipeline(parts, cfg, device)


def generate(ckpt: str | Path, prompts: list[str] | str, *, seed: int = 0, steps: int | None = None,
             cfg: float | None = None, guidance: str | None = None, sampler: str | None = None,
             size: tuple[int, int] | None = None) -> list[Image.Image]:
    """Prompts → PIL images with the checkpoint's EMA weights; prompt i uses seed + i."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return load_pipeline(ckpt)(prompts, seed=seed, steps=steps, cfg=cfg, guidance=guidance, sampler=sampler, size=size)


def save_samples(ckpt: str | Path, prompts: list[str], out: str | Path, *, seed: int = 0, steps: int | None = None,
                 cfg: float | None = None, guidance: str | None = None, sampler: str | None = None,
                 size: tuple[int, int] | None = None, batch: int = 16, force: bool = False, captions: bool = False,
                 progress: bool = False, warn=None) -> list[Path]:
    """`daybreak sample` as a call: the prompts generated with a checkpoint's EMA weights and written as PNGs
    whose text metadata holds the prompt, the seed and the settings given (prompt i on seed `seed + i`).

    `out`: one image file (one prompt), or a directory (an existing one, or a path ending in "/") that gets
    `000.png`, `001.png`, ... and `grid.png` (the prompts written under it with `captions`). Nothing is
    overwritten without `force`: an existing file, or in a non-empty directory the files it would write,
    are refused before any work. Returns the paths written (a directory's grid last). Prompts cut at
    the text tower's length are reported through `warn` (default: a line on stderr)."""
    import sys

    from daybreak.images import image_grid, save_png
    from daybreak.io.store import check_output

    path = Path(out)
    as_dir = str(out).endswith(("/", "\\")) or path.is_dir()
    if not as_dir:
        if len(prompts) > 1:
            raise UserError(f"--out '{out}' names one file, but there are {len(prompts)} prompts; "
                            f"give a directory with a trailing slash, e.g. --out {path.with_suffix('')}/")
        if path.suffix.lower() not in Image.registered_extensions():
            raise UserError(f"--out '{out}' needs an image extension (e.g. .png) or a trailing / for a directory")
    check_output(path, directory=as_dir, force=force)
    names = [f"{i:03d}.png" for i in range(len(prompts))] + ["grid.png"]
    if as_dir and not force:  # an empty directory: refuse the files it would overwrite all the same
        for name in names:
            check_output(path / name, directory=False)
    pipe = load_pipeline(ckpt)
    settings = dict(steps=steps, cfg=cfg, guidance=guidance, sampler=sampler, size=tuple(size) if size else None)
    images: list[Image.Image] = []
    cut_before = getattr(pipe.text_encoder, "truncated", 0)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        images += pipe(chunk, seeds=[seed + i + j for j in range(len(chunk))], progress=progress, **settings)
    cut = getattr(pipe.text_encoder, "truncated", 0) - cut_before
    if cut:
        n = pipe.text_encoder.max_tokens
        (warn or (lambda line: print(line, file=sys.stderr)))(
            f"warning: {cut} of {len(prompts)} prompts are longer than the text tower's {n} tokens: "
            f"kept the first {n} tokens of each (text.max_tokens)")
    meta = {k: v for k, v in settings.items() if v is not None}
    if not as_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(images[0], path, {"prompt": prompts[0], "seed": seed, **meta})
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    for i, (img, p) in enumerate(zip(images, prompts)):
        save_png(img, path / names[i], {"prompt": p, "seed": seed + i, **meta})
    image_grid(images, captions=prompts if captions else None).save(path / "grid.png")
    return [path / name for name in names]
