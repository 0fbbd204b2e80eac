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
from typing import Any, Protocol, runtime_checkable

import torch

from daybreak.errors import UserError

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


TEXT_ENCODER_KINDS = ("demo", "t5gemma", "t5", "clip", "causal-lm", "qwen3vl")


def build_text_encoder(kind: str, **kwargs: Any) -> TextEncoder:
    """The text tower named by config `text.kind`, built from the remaining `text.*` keys."""
    if kind == "demo":
        from daybreak.text.demo import DemoTextEncoder

        return DemoTextEncoder(**kwargs)
    if kind in TEXT_ENCODER_KINDS:
        from daybreak.text.hf import HFTextEncoder

        return HFTextEncoder(kind=kind, **kwargs)
    raise UserError(f"text.kind must be one of {', '.join(TEXT_ENCODER_KINDS)}, got {kind!r}")
