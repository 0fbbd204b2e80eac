"""`daybreak cache latents | text`: fill a run's latent and text-embedding caches before training.

Training fills both caches as it goes, but only for the samples it has reached, and every rank pays
the frozen encoders' compute for the first epoch. Filling them up front, once, moves that work out
of the run: each step then reads a few small files per sample instead of running the VAE encoder
and the text tower. Both commands read the data exactly as the trainer does (same source, keys,
caption columns and buckets, from the same config), skip what the cache already holds, and return
how many entries they added.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from daybreak.config import Config
from daybreak.data import BucketLoader, CaptionMixer, MixSource, SkipSample, build_data, nearest_bucket, open_data
from daybreak.data.buckets import resize_to_bucket, uint8_to_pixels
from daybreak.errors import UserError
from daybreak.build import build_text, pixels_per_token
from daybreak.space import CachedLatentSpace, build_space
from daybreak.devices import pick_device


def _identity(item: Any) -> Any:
    return item


class _Resized(Dataset):
    """Worker side: sample i resized to its bucket, as (bucket index, uint8 H×W×3, key), or None
    for a sample the loader would skip (bad image, no usable caption)."""

    def __init__(self, loader: BucketLoader) -> None:
        self.source, self.buckets, self.mixer = loader.source, loader.buckets, loader.mixer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, str] | None:
        try:
            (w, h), captions = self.source.probe(i)
            if self.mixer.column(captions, 0, i) is None:
                return None
            sample = self.source[i]
        except SkipSample:
            return None
        b = self.buckets.index(nearest_bucket(w, h, self.buckets))
        return b, resize_to_bucket(sample["image"], self.buckets[b]), sample["key"]


def cache_latents(cfg: Config, *, progress: bool = True) -> int:
    """Encode every usable sample of `data` at its bucket into `space.cache_dir`; returns how many
    latents were added (samples already cached are read, not re-encoded)."""
    if cfg.space.kind != "latents" or not cfg.space.cache_dir:
        raise UserError("`daybreak cache latents` needs space.kind=latents and space.cache_dir")
    device = pick_device(cfg.train.device)
    space: CachedLatentSpace = build_space(cfg.space).to(device)
    patch = pixels_per_token(cfg, space)
    loader = build_data(cfg, batch_size=cfg.train.micro_batch, patch=patch, log=tqdm.write)
    pending: dict[int, list[tuple[np.ndarray, str]]] = defaultdict(list)

    def flush(items: list[tuple[np.ndarray, str]]) -> None:
        pixels = uint8_to_pixels(np.stack([a for a, _ in items])).to(device)
        space.encode(pixels, keys=[k for _, k in items])
        items.clear()

    workers = cfg.data.num_workers
    samples = DataLoader(_Resized(loader), batch_size=None, num_workers=workers, collate_fn=_identity,
                         prefetch_factor=4 if workers else None)
    for item in tqdm(samples, total=len(loader.source), desc="latent cache", unit="img", disable=not progress):
        if item is None:
            continue
        b, array, key = item
        pending[b].append((array, key))
        if len(pending[b]) == cfg.train.micro_batch:
            flush(pending[b])
    for items in pending.values():
        if items:
            flush(items)
    return space.encoded


def _training_captions(cfg: Config, progress: bool) -> list[str]:
    """Every caption the run can draw: each sample's caption columns (those its `captions` weighs, when
    it weighs any), plus the empty caption of dropout and guidance. A mix's entries are read once each."""
    source = open_data(cfg)[0]
    if isinstance(source, MixSource):
        parts = [(CaptionMixer(e.captions).weights, src) for e, src in zip(cfg.data.mix, source.sources)]
    else:
        parts = [(CaptionMixer(cfg.data.captions).weights, source)]
    captions: list[str] = [""]
    for weights, src in parts:
        for i in tqdm(range(len(src)), desc="captions", unit="sample", disable=not progress):
            try:
                _, columns = src.probe(i)
            except SkipSample:
                continue
            captions += [text for column, text in columns.items() if not weights or column in weights]
    return captions


def cache_text(cfg: Config, *, progress: bool = True, batch_size: int = 64) -> int:
    """Encode every training caption of `data` (and `sample.prompts`) with the configured frozen text
    tower into `text.cache_dir`; returns how many captions were added."""
    from daybreak.text.cache import CachedTextEncoder, build_cache

    if not cfg.text.cache_dir:
        raise UserError("`daybreak cache text` needs text.cache_dir")
    text: Any = build_text(cfg) if cfg.text.kind != "demo" else None
    if not isinstance(text, CachedTextEncoder):
        raise UserError(f"text.kind={cfg.text.kind} is trained with the model and cannot be cached; "
                        "use a frozen pretrained tower (t5gemma, t5, clip, causal-lm, qwen3vl)")
    encoder = text.encoder.to(pick_device(cfg.train.device))
    captions = _training_captions(cfg, progress) + list(cfg.sample.prompts)
    return build_cache(encoder, captions, cfg.text.cache_dir, batch_size=batch_size)
