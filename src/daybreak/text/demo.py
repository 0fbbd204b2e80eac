"""A download-free text tower for the demo: fixed word vocabulary + a small trainable encoder.

The shapes captions use a few dozen words, so a word-level vocabulary covers them exactly and a
two-layer transformer trained jointly with the diffusion model learns what it needs in minutes.
A `<bos>` token always comes first, so the null caption "" still has one valid (attendable) token.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from daybreak.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from daybreak.text import clean_prompt

SPECIAL = ("<pad>", "<bos>", "<unk>")
PAD, BOS, UNK = 0, 1, 2
_COMMON = (
    "a an the of on in at with and to is are this that it its there one two three some "
    "plain background image photo picture drawing shape object simple colored coloured "
    "big tiny little medium middle centre upper lower corner side top left right bottom center "
    "dark light bright gray grey black brown navy charcoal purple orange pink cyan"
).split()


def _vocabulary() -> list[str]:
    words = [*COLORS, *SHAPES, *POSITIONS, *SIZES, *(w for name in BACKGROUNDS for w in name.split())]
    words += _COMMON
    return [*SPECIAL, *dict.fromkeys(words)]  # ordered, without duplicates


VOCAB: list[str] = _vocabulary()
_WORD = re.compile(r"[a-z0-9]+")


class DemoTextEncoder(nn.Module):
    """`encode(prompts) -> (embeds B×max_tokens×dim, mask B×max_tokens bool)`, trainable.

    Prompts are cleaned (`daybreak.text.clean_prompt`), split into lower-case words, mapped to
    ids (`<unk>` outside the vocabulary), prefixed with `<bos>` and cut or padded to `max_tokens`.
    Padded positions of the output are zero and masked out.
    """

    trainable = True

    def __init__(self, dim: int = 64, max_tokens: int = 16, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.dim, self.max_tokens = dim, max_tokens
        self.vocab = {word: i for i, word in enumerate(VOCAB)}
        self.truncated = 0  # prompts cut to max_tokens so far, for the trainer's log
        self.embed = nn.Embedding(len(VOCAB), dim, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids B×max_tokens long, mask B×max_tokens bool) on the module's device."""
        ids = torch.full((len(prompts), self.max_tokens), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = _WORD.findall(clean_prompt(prompt))
            tokens = [BOS, *(self.vocab.get(w, UNK) for w in words)]
            if len(tokens) > self.max_tokens:
                self.truncated += 1
                tokens = tokens[: self.max_tokens]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        device = self.embed.weight.device
        return ids.to(device), (ids != PAD).to(device)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        hidden = self.embed(ids) + self.position
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)
        return self.norm(hidden) * mask.unsqueeze(-1), mask

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(prompts)
