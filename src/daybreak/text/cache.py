"""Disk cache of frozen text embeddings: encode each caption once, not once per epoch per GPU.

A 2B text encoder costs about as much per step as a small diffusion model, and its output for a
caption never changes. Entries are keyed by sha256(encoder fingerprint, cleaned caption), so a
different tower, layer or token budget never reads stale vectors. One small safetensors file per
caption (valid token rows + mask) under a two-hex-digit fan-out: a batch lookup is one read per
caption, writes are atomic renames, and any number of processes can fill the cache together.

In training the reads run in the data loader's workers (`CaptionLookup`, the loader's batch hook),
off the step's critical path: at batch 32 they are ~100 ms of host time a step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from daybreak.devices import to_device
from daybreak.io.store import ContentStore
from daybreak.text import clean_prompt


class TextEmbeddingCache:
    """`get`/`put` of one caption's `(embeds L×dim, mask L)`; only rows where mask is set are stored."""

    def __init__(self, dir: str | os.PathLike[str], encoder_fingerprint: str,
                 clean: Callable[[str], str] = clean_prompt) -> None:
        self.store = ContentStore(dir)
        self.fingerprint = encoder_fingerprint
        self.clean = clean  # the encoder's own cleaning: captions it reads alike share an entry

    def _parts(self, caption: str) -> tuple[str, str]:
        return self.fingerprint, self.clean(caption)

    def __contains__(self, caption: str) -> bool:
        return self._parts(caption) in self.store

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeds L×dim with zeros at masked positions, mask L bool) on CPU, or None on a miss."""
        stored = self.store.get_tensors(*self._parts(caption))
        if stored is None:
            return None
        mask = stored["mask"]
        embeds = stored["embeds"].new_zeros(mask.shape[0], stored["embeds"].shape[1])
        embeds[mask] = stored["embeds"]
        return embeds, mask

    def put(self, caption: str, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        self.store.put_tensors({"embeds": embeds[mask], "mask": mask}, *self._parts(caption))


class CaptionLookup:
    """The loader's batch hook (run in its workers): adds the captions' cached `text_embeds` (B×L×dim)
    and `text_mask` (B×L) to a batch, the values `CachedTextEncoder.encode` returns. A batch with a
    caption not in the cache goes without them, and the trainer encodes it (filling the cache)."""

    def __init__(self, cache: TextEmbeddingCache) -> None:
        self.cache = cache

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        found = {c: self.cache.get(c) for c in dict.fromkeys(batch["captions"])}
        if all(hit is not None for hit in found.values()):
            batch["text_embeds"] = torch.stack([found[c][0] for c in batch["captions"]])
            batch["text_mask"] = torch.stack([found[c][1] for c in batch["captions"]])
        return batch


class CachedTextEncoder(nn.Module):
    """A frozen text encoder behind a `TextEmbeddingCache`: hits are read, misses encoded and stored.

    Returns exactly what the wrapped encoder returns for the same captions (the wrapped encoder
    must zero its padded positions, as `HFTextEncoder` does), on the encoder's device.
    """

    trainable = False

    def __init__(self, encoder: Any, cache: TextEmbeddingCache) -> None:
        if encoder.trainable:
            raise ValueError("a trainable text encoder changes every step and cannot be cached")
        super().__init__()
        self.encoder, self.cache = encoder, cache
        self.dim, self.max_tokens = encoder.dim, encoder.max_tokens

    def loader_hook(self) -> CaptionLookup:
        """The data loader's batch hook that reads this cache in its workers."""
        return CaptionLookup(self.cache)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        found = {p: self.cache.get(p) for p in dict.fromkeys(prompts)}
        misses = [p for p, hit in found.items() if hit is None]
        if misses:
            embeds, mask = self.encoder.encode(misses)
            for i, prompt in enumerate(misses):
                self.cache.put(prompt, embeds[i], mask[i])
                found[prompt] = (embeds[i].cpu(), mask[i].cpu())
        device = getattr(self.encoder, "device", torch.device("cpu"))
        embeds = to_device(torch.stack([found[p][0] for p in prompts]), device)
        mask = to_device(torch.stack([found[p][1] for p in prompts]), device)
        return embeds, mask


def build_cache(
    encoder: Any, captions: Iterable[str], dir: str | os.PathLike[str], batch_size: int = 64
) -> int:
    """Encode every caption not yet in the cache at `dir`; returns how many were newly encoded."""
    cache = TextEmbeddingCache(dir, encoder.fingerprint, encoder.clean)
    todo = [c for c in dict.fromkeys(encoder.clean(c) for c in captions) if c not in cache]
    for start in tqdm(range(0, len(todo), batch_size), desc="text cache", unit="batch"):
        batch = todo[start : start + batch_size]
        embeds, mask = encoder.encode(batch)
        for i, caption in enumerate(batch):
            cache.put(caption, embeds[i], mask[i])
    return len(todo)
