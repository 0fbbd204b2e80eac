"""Text towers: one small protocol so the trainer, sampler and cache treat every encoder alike.

An encoder turns prompts into `(embeds B×L×dim float, mask B×L bool)`. Frozen pretrained towers
(`daybreak.text.hf`) run without grad and can be cached (`daybreak.text.cache`); the demo tower
(`daybreak.text.demo`: a tokenizer learned from the run's captions and a small transformers encoder)
is trained jointly with the diffusion model, so it says `trainable=True` and the trainer puts its
parameters into the optimizer.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from daybreak.schema import Registry, ranged

_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_TAG = re.compile(r"<[^<>]{1,64}>")
_HANDLE = re.compile(r"@\w+")
_SPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Clean a caption the same way for training, caching and sampling.

    Cleaning means: Unicode NFKC normalisation, HTML entities unescaped, URLs, HTML tags and
    @handles removed, runs of whitespace collapsed to one space, ends stripped, lower-cased.
    """
    text = unicodedata.normalize("NFKC", html.unescape(str(text)))
    for pattern in (_URL, _TAG, _HANDLE):
        text = pattern.sub(" ", text)
    return _SPACE.sub(" ", text).strip().lower()


def basic_clean(text: str) -> str:
    """PRX's light cleaning for towers that read text as written (its `skip_text_cleaning`, the
    Qwen3-VL tower): mojibake fixed (ftfy), HTML entities unescaped, ends stripped; case kept."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(str(text)))).strip()


@runtime_checkable
class TextEncoder(Protocol):
    """What every text tower offers; `encode("")` is the null caption used for CFG and dropout."""

    dim: int
    max_tokens: int
    trainable: bool

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def _demo(c: TextConfig, tokenizer: Any, dtype: str) -> TextEncoder:
    from daybreak.text.demo import DemoTextEncoder

    return DemoTextEncoder(tokenizer, dim=c.dim, max_tokens=c.max_tokens, layers=c.layers)


def _pretrained(c: TextConfig, tokenizer: Any, dtype: str) -> TextEncoder:
    from daybreak.text.hf import HFTextEncoder

    return HFTextEncoder(kind=c.kind, path=c.path, max_tokens=c.max_tokens, hidden_state=c.hidden_state, dtype=dtype)


# `text.kind`: the download-free demo tower (trained with the model), or a frozen pretrained one (`daybreak.text.hf`)
TEXT_TOWERS = Registry("text.kind", {
    "demo": _demo,
    **{kind: _pretrained for kind in ("t5gemma", "t5", "clip", "causal-lm", "qwen3vl")},
})


@dataclass
class TextConfig:
    """Config section `text`: the text tower, its width and tokens, and its embedding cache."""

    kind: TEXT_TOWERS.choices = "demo"
    path: str | None = None
    max_tokens: int = ranged(16, ge=1)
    dim: int = ranged(128, ge=1)  # demo encoder width (transformers encoders report their own)
    layers: int = ranged(2, ge=1)  # demo encoder depth
    vocab_size: int = ranged(8192, ge=259)  # demo tokenizer: most BPE tokens (merges stop earlier once no pair repeats)
    tokenizer_sample: int = ranged(20_000, ge=1)  # demo tokenizer: items whose captions it is trained on (all, when fewer)
    hidden_state: int = -1
    cache_dir: str | None = None  # text-embedding cache (frozen encoders only)
    dtype: Literal["bf16", "fp32"] | None = None  # frozen pretrained towers' weights; None: bf16 on CUDA, fp32 elsewhere


def build_text_encoder(c: TextConfig, tokenizer: Any = None, dtype: str = "float32") -> TextEncoder:
    """The tower of the `text` section `c`: the demo one with `tokenizer` (a `tokenizers` tokenizer), a
    pretrained one loaded in `dtype` (a torch dtype name)."""
    return TEXT_TOWERS[c.kind](c, tokenizer, dtype)
