"""Frozen pretrained text towers from transformers, loaded through the library's own loaders.

PRX conditions on the T5-Gemma 2B encoder's last hidden state (2304-d, 256 tokens with mask); the
same class also runs T5 and CLIP text encoders and the hidden states of a small decoder-only LM,
so the ablations can swap the tower with one config key. The weights are never trained here.

`qwen3vl` is PRX's Qwen3-VL text tower (`text_tower/qwen3vl_2b_256_bf16.yaml`: Qwen/Qwen3-VL-Embedding-2B,
2048-d, 256 tokens with mask, last hidden state): the checkpoint loads as transformers'
`Qwen3VLForConditionalGeneration` (its keys carry the `model.` prefix of that class) and only its text
backbone, `model.language_model` (`Qwen3VLTextModel`, run as transformers runs it), is kept; the vision
tower is dropped after loading. Prompts get PRX's light cleaning (`basic_clean`: case kept), as its
`skip_text_cleaning: true`; a folder holding the bare `Qwen3VLTextModel` (an export's) loads directly.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from daybreak.devices import to_device
from daybreak.errors import UserError
from daybreak.text import basic_clean, clean_prompt

DEFAULT_PATHS = {"t5gemma": "google/t5gemma-2b-2b-ul2"}
DEFAULT_MAX_TOKENS = {"t5gemma": 256, "t5": 256, "clip": 77, "causal-lm": 256, "qwen3vl": 256}
_DOWNLOAD_HINTS = {
    "t5gemma": "google/t5gemma-2b-2b-ul2",
    "t5": "a T5 checkpoint such as google/t5-v1_1-xxl",
    "clip": "a CLIP checkpoint such as openai/clip-vit-large-patch14",
    "causal-lm": "a small decoder-only LM such as Qwen/Qwen3-0.6B",
    "qwen3vl": "Qwen/Qwen3-VL-Embedding-2B",
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _resolve_path(kind: str, path: str | None) -> str:
    hint = f"download {_DOWNLOAD_HINTS[kind]} (e.g. `hf download <id> --local-dir DIR`) and set text.path=DIR"
    if path is None:
        raise UserError(f"text.path is not set for text.kind={kind}: {hint}")
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if _HUB_ID.fullmatch(path):
        return path  # a hub id: the local Hugging Face cache may hold it
    raise UserError(f"text.path {path!r} does not exist: {hint}")


@functools.cache
def _t5gemma_encoder() -> type:
    from transformers import T5GemmaEncoderModel

    class T5GemmaEncoderOnly(T5GemmaEncoderModel):
        """Loads the encoder of an encoder-decoder checkpoint; its decoder weights are expected extras."""

        _keys_to_ignore_on_load_unexpected = [r"(^|\.)decoder\.", r"(^|\.)lm_head\."]

    return T5GemmaEncoderOnly


def _load_model(kind: str, path: str, dtype: torch.dtype) -> nn.Module:
    import transformers

    if kind == "t5gemma":  # hub checkpoints are encoder-decoder: keep the encoder only
        return _t5gemma_encoder().from_pretrained(path, is_encoder_decoder=False, dtype=dtype)
    if kind == "qwen3vl":  # the whole vision-language checkpoint, then its text backbone only
        if transformers.AutoConfig.from_pretrained(path).model_type == "qwen3_vl_text":
            return transformers.Qwen3VLTextModel.from_pretrained(path, dtype=dtype)
        return transformers.Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).model.language_model
    loader = {
        "t5": transformers.T5EncoderModel,
        "clip": transformers.CLIPTextModel,
        "causal-lm": transformers.AutoModel,  # the base model: hidden states, no LM head
    }[kind]
    return loader.from_pretrained(path, dtype=dtype)


class HFTextEncoder(nn.Module):
    """`encode(prompts) -> (embeds B×max_tokens×dim float32, mask B×max_tokens bool)`, frozen.

    Prompts are cleaned and lower-cased with `daybreak.text.clean_prompt` (NFKC, HTML entities
    unescaped, URLs/tags/@handles removed, whitespace collapsed; `qwen3vl`: `basic_clean`), tokenized
    with the checkpoint's
    own tokenizer and its special tokens, right-padded to `max_tokens` and truncated there;
    `truncated` counts the prompts cut so far. `hidden_state=-1` takes the model's
    `last_hidden_state` (after its final norm); other values index its `hidden_states`
    (0 = token embeddings). Padded positions of the output are zero. A prompt that tokenizes to
    nothing ("" with a tokenizer that adds no special tokens, as many decoder-only LMs do) gets
    one valid token, the tokenizer's bos (else eos) token, so the null caption is never empty.
    """

    trainable = False

    def __init__(
        self,
        kind: str = "t5gemma",
        path: str | None = None,
        max_tokens: int | None = None,
        hidden_state: int = -1,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.kind, self.hidden_state = kind, hidden_state
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS[kind]
        source = _resolve_path(kind, path if path is not None else DEFAULT_PATHS.get(kind))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = _load_model(kind, source, getattr(torch, dtype))
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"text.path {source!r}: cannot load a {kind} text encoder ({reason}); "
                f"download {_DOWNLOAD_HINTS[kind]} and set text.path to its folder"
            ) from error
        self.clean = basic_clean if kind == "qwen3vl" else clean_prompt
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        tok = self.tokenizer
        specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        self._filler = next(i for i in specials if i is not None)
        self.model.requires_grad_(False).eval()
        self.dim = self.model.get_input_embeddings().embedding_dim
        self.truncated = 0
        self.fingerprint = hashlib.sha256(
            f"{kind}|{source}|{self.max_tokens}|{hidden_state}|{dtype}".encode()
        ).hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the parent module does
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids B×max_tokens long, mask B×max_tokens bool) on the model's device."""
        cleaned = [self.clean(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(cleaned)["input_ids"]]
        self.truncated += sum(n > self.max_tokens for n in lengths)
        batch = self.tokenizer(
            cleaned, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        empty = ~mask.any(dim=1)
        ids[empty, 0], mask[empty, 0] = self._filler, True
        return to_device(ids, self.device), to_device(mask, self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        wants_all = self.hidden_state != -1
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=wants_all)
        hidden = out.hidden_states[self.hidden_state] if wants_all else out.last_hidden_state
        return hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0), mask

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)
