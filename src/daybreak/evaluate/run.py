"""Evaluation runs: sample a fixed prompt set with fixed seeds, then score against real images.

One `Evaluator` holds what is expensive and shared between calls (feature extractors, the
reference set's cached statistics, the prompt list), so periodic evaluation during training and
the post-hoc curve of an ablation pay for them once. `evaluate_checkpoint` is `daybreak eval`.

Metric names and what they are:

| name | features | comparison |
|---|---|---|
| fid | Inception-v3 pool3 (standard FID weights, uint8 input) | Fréchet distance |
| fd_dino | DINOv2 ViT-L/14-reg CLS | Fréchet distance |
| cmmd | CLIP ViT-L/14-336 image embeddings | MMD (σ 10, × 1000) |
| dino_mmd | DINOv2 ViT-L/14-reg CLS | MMD (σ 10, × 1000) |
| clip_score | CLIP image vs prompt embeddings | 100 · cos |
| fd_tiny | fixed random conv net (no download; demo only) | Fréchet distance |
| adherence | pixel judge of colour, shape and position (shapes prompts) | share of hits |

Prompts are the eval data's captions, or the fixed SHAPES_PROMPTS for shapes data (cycled to N),
prompt i with seed `eval.seed + i`. The reference set is real images from the same data source
(for shapes a held-out ShapesDataset seed), resized to the model's resolution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from daybreak.config import Config
from daybreak.data.mix import named_columns
from daybreak.data.shapes import SHAPES_PROMPTS, ShapesDataset
from daybreak.data.sources import SOURCES
from daybreak.errors import UserError
from daybreak.io.store import write_json
from daybreak.evaluate.adherence import adherence
from daybreak.evaluate.features import FeatureExtractor, ReferenceStats, build_extractor
from daybreak.metrics import clip_score, frechet_from_stats, mmd
from daybreak.images import image_grid
from daybreak.devices import default_device
from daybreak.pipeline import Pipeline, load_pipeline

# metric → (feature extractor, comparison)
METRICS: dict[str, tuple[str | None, str]] = {
    "fid": ("inception", "fd"),
    "fd_dino": ("dino", "fd"),
    "cmmd": ("clip", "mmd"),
    "dino_mmd": ("dino", "mmd"),
    "clip_score": ("clip", "clip_score"),
    "fd_tiny": ("tiny", "fd"),
    "adherence": (None, "adherence"),
}
HIGHER_IS_BETTER = {"adherence", "clip_score"}
NOTES = {
    "fid": "standard FID: Inception-v3 pool3 (pt_inception-2015-12-05 weights) on uint8 images, "
    "as pytorch-fid/torch-fidelity; PRX's own FID fed uint8 to a float metric and is not comparable",
    "fd_tiny": "Fréchet distance on a fixed random conv net (seed 0, 64-d): comparable only with other "
    "fd_tiny values at the same resolution, never with FID",
    "cmmd": "CMMD: CLIP ViT-L/14-336 embeddings, biased MMD, RBF σ=10, ×1000",
    "dino_mmd": "DINOv2 ViT-L/14-reg CLS at 518², biased MMD, RBF σ=10, ×1000",
}
REFERENCE_SEED = 1_000_003  # shapes reference images: a seed no training run uses
REF_BATCH = 64


def parse_metrics(metrics: str | list[str]) -> list[str]:
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return names


def parse_data(spec: str | None, cfg: Config) -> tuple[str, str | None]:
    """`--data`: None (the checkpoint's data: a mix's first entry), `shapes`, `KIND:PATH`, or a folder of images."""
    if spec is None:
        return (cfg.data.mix[0].source, cfg.data.mix[0].path) if cfg.data.mix else (cfg.data.source, cfg.data.path)
    if spec == "shapes":
        return "shapes", None
    kinds = [k for k in SOURCES if k != "shapes"]  # the sources read from a path
    kind, sep, path = spec.partition(":")
    if sep and kind in kinds:
        return kind, path
    if Path(spec).is_dir():
        return "imagefolder", spec
    raise UserError(f"--data '{spec}': give 'shapes', a folder of images, or KIND:PATH ({', '.join(kinds)})")


def _to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


class Evaluator:
    """Scores generated images; extractors and reference statistics are built once, up front.

    Building everything in the constructor means a missing weight file fails before any sampling.
    """

    def __init__(self, cfg: Config, metrics: list[str], *, num: int, data: str | None = None,
                 ref_num: int | None = None, cache_dir: str | os.PathLike | None = None,
                 device: torch.device | None = None):
        if num < 2:
            raise UserError(f"--num must be at least 2 (a Fréchet distance needs 2 images), got {num}")
        self.cfg, self.metrics, self.num = cfg, parse_metrics(metrics), num
        self.device = device or default_device()
        self.size = cfg.data.image_size
        self.source, self.path = parse_data(data, cfg)
        own = cfg.data.mix[0] if data is None and cfg.data.mix else cfg.data  # whose caption columns prompts use
        self.caption_weights, self.image_column = own.captions, own.image_column
        self.caption_columns = named_columns(own.captions, getattr(own, "caption_columns", None))
        self.ref_num = ref_num or cfg.eval.ref_num
        self.cache_dir = Path(cache_dir or cfg.eval.cache_dir or Path.home() / ".cache/daybreak/refstats")
        if "adherence" in self.metrics and self.source != "shapes":
            raise UserError("the adherence metric judges shapes prompts only; use --data shapes or drop it")
        self.prompts = self._prompts()
        self.extractors: dict[str, FeatureExtractor] = {}
        for name in self.metrics:
            kind = METRICS[name][0]
            if kind is not None and kind not in self.extractors:
                self.extractors[kind] = build_extractor(kind, cfg.eval, self.device)
        self.reference = {kind: self._reference(ex) for kind, ex in self.extractors.items()}

    # ------------------------------------------------------------------ data
    def _open(self, length: int):
        from daybreak.data import open_source

        if self.source == "shapes":
            return ShapesDataset(size=self.size, seed=REFERENCE_SEED, length=length)
        return open_source(self.source, self.path, image_column=self.image_column,
                           caption_columns=self.caption_columns, cache_dir=self.cfg.data.cache_dir)

    def _prompts(self) -> list[str]:
        if self.source == "shapes":
            return [SHAPES_PROMPTS[i % len(SHAPES_PROMPTS)] for i in range(self.num)]
        source = self._open(self.num)
        if len(source) < self.num:
            raise UserError(f"--num {self.num}: the eval data has only {len(source)} images")
        order = sorted(self.caption_weights, key=lambda c: -self.caption_weights[c])
        prompts = []
        for i in range(self.num):
            caps = source[i]["captions"]
            column = next((c for c in order if caps.get(c)), None) or next(iter(caps), None)
            if column is None:
                raise UserError(f"eval data item {i} has no caption to use as a prompt")
            prompts.append(caps[column])
        return prompts

    def _reference_batches(self) -> Iterator[torch.Tensor]:
        source = self._open(self.ref_num)
        count = min(self.ref_num, len(source))
        for start in range(0, count, REF_BATCH):
            images = [source[i]["image"] for i in range(start, min(start + REF_BATCH, count))]
            yield _to_uint8([ImageOps.fit(im.convert("RGB"), (self.size, self.size), Image.BICUBIC) for im in images])

    def _reference(self, extractor: FeatureExtractor) -> ReferenceStats:
        key = f"{self.source}|{self.path}|{self.size}px|{self.ref_num}|seed{REFERENCE_SEED}"
        return ReferenceStats.load_or_compute(extractor, self._reference_batches(), key, self.cache_dir)

    # ------------------------------------------------------------------ sampling and scoring
    def generate(self, pipe: Pipeline, *, seed: int | None = None, steps: int | None = None,
                 scale: float | None = None, guidance: str | None = None,
                 indices: list[int] | None = None) -> list[Image.Image]:
        """The prompt set (or its prompts `indices`, a rank's share) with prompt i on seed `seed + i`,
        in batches of `eval.batch_size`."""
        cfg = self.cfg
        seed = cfg.eval.seed if seed is None else seed
        batch = cfg.eval.batch_size
        settings = dict(steps=steps or cfg.eval.steps,
                        cfg=cfg.eval.cfg if scale is None else scale,
                        guidance=guidance or cfg.eval.guidance)
        indices = list(range(self.num)) if indices is None else indices
        images: list[Image.Image] = []
        for start in range(0, len(indices), batch):
            chunk = indices[start: start + batch]
            images += pipe([self.prompts[i] for i in chunk], seeds=[seed + i for i in chunk],
                           size=(self.size, self.size), **settings)
        return images

    def score(self, images: list[Image.Image]) -> dict[str, float]:
        pixels = _to_uint8(images)
        features = {kind: ex(pixels) for kind, ex in self.extractors.items()}
        out: dict[str, float] = {}
        for name in self.metrics:
            kind, how = METRICS[name]
            if how == "adherence":
                out[name] = adherence(images, self.prompts)[0]
            elif how == "fd":
                ref = self.reference[kind]
                gen = ReferenceStats.from_features(features[kind])
                out[name] = frechet_from_stats(gen.mu, gen.sigma, ref.mu, ref.sigma)
            elif how == "mmd":
                out[name] = mmd(features[kind], self.reference[kind].features)
            else:
                out[name] = clip_score(features[kind], self.extractors[kind].encode_text(self.prompts))
        return out


def default_eval_path(ckpt: Path) -> Path:
    """runs/NAME/eval/<checkpoint name>.json: next to the run, never inside a checkpoint."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "eval" / f"{ckpt.name}.json"


def evaluate_checkpoint(ckpt: str | os.PathLike, metrics: str | list[str] | None = None, *, data: str | None = None,
                        num: int | None = None, out: str | os.PathLike | None = None, seed: int | None = None,
                        steps: int | None = None, scale: float | None = None, guidance: str | None = None,
                        cache_dir: str | os.PathLike | None = None, evaluator: Evaluator | None = None,
                        device: torch.device | None = None, grid: bool = True, ema: bool = True) -> dict:
    """`daybreak eval`: sample, score, write `out` (JSON) and a sample grid beside it; returns the JSON.

    Unset arguments come from the checkpoint's `eval.*` config. An `evaluator` built for the same
    data can be passed in to reuse its extractors and reference statistics (ablation curves).
    `ema=False` scores the raw weights; a run trained without EMA is always scored on its raw weights.
    """
    pipe = load_pipeline(ckpt, ema=ema, device=device)
    cfg = pipe.cfg
    ev = evaluator or Evaluator(cfg, parse_metrics(metrics or cfg.eval.metrics),
                                num=num or cfg.eval.num, data=data, cache_dir=cache_dir,
                                device=pipe.device)
    images = ev.generate(pipe, seed=seed, steps=steps, scale=scale, guidance=guidance)
    values = ev.score(images)
    meta = json.loads((Path(ckpt) / "meta.json").read_text()) if (Path(ckpt) / "meta.json").is_file() else {}
    out = Path(out) if out else default_eval_path(Path(ckpt))
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "metrics": values,
        "num": ev.num,
        "seed": cfg.eval.seed if seed is None else seed,
        "steps": steps or cfg.eval.steps,
        "cfg": cfg.eval.cfg if scale is None else scale,
        "guidance": guidance or cfg.eval.guidance or cfg.sample.guidance,
        "weights": "ema" if ema and cfg.ema.enabled else "raw",
        "reference": {"source": ev.source, "path": ev.path, "num": ev.ref_num,
                      "size": ev.size, **({"seed": REFERENCE_SEED} if ev.source == "shapes" else {})},
        "notes": {k: NOTES[k] for k in ev.metrics if k in NOTES},
    }
    if grid:
        path = out.with_name(f"{out.stem}_grid.png")
        shown = min(len(images), 16)
        image_grid(images[:shown], cols=8, captions=ev.prompts[:shown]).save(path)
        result["grid"] = str(path)
    write_json(out, result)
    return result
