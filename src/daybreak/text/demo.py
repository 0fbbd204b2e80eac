"""A download-free text tower for any captions: a tokenizer learned from the run's captions + a small
transformers encoder trained jointly with the diffusion model.

The tokenizer is byte-level BPE from the Hugging Face `tokenizers` library (GPT-2's scheme,
Radford et al. 2019): its alphabet is the 256 bytes, so a word never seen in training still
tokenises into known pieces (down to single bytes), never into `<unk>`. Merges are learned from the
training captions until no pair of tokens occurs twice or `vocab_size` is reached, so the data
chooses the size (the shapes captions give a few hundred tokens). Cleaning (`clean_prompt`) is part
of the tokenizer's own normalizer, and `<s>` is prepended by its post-processor, so the null
caption "" is one valid token and a diffusers pipeline that loads the saved tokenizer encodes
prompts exactly as daybreak does.

The encoder is a `DistilBertModel` (Sanh et al. 2019) built from a config: a plain transformers
model without tied or unused weights, so it checkpoints like any module and `daybreak export`
saves it as the pipeline's `text_encoder/`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from daybreak.devices import to_device
from daybreak.errors import UserError
from daybreak.text import clean_prompt

PAD_TOKEN, BOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "<unk>"
SPECIAL = (PAD_TOKEN, BOS_TOKEN, UNK_TOKEN)
PAD, BOS, UNK = 0, 1, 2
# `clean_prompt`'s patterns, written for the tokenizer's (Oniguruma) regex engine
_CLEANING = (r"(?i)\b(?:https?://|www\.)\S+", r"<[^<>]{1,64}>", r"@\w+")


def train_tokenizer(captions: Iterable[str], vocab_size: int = 8192):
    """A byte-level BPE tokenizer (a transformers `PreTrainedTokenizerFast`) trained on `captions`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), *(normalizers.Replace(Regex(p), " ") for p in _CLEANING),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase(),
    ])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, 256 + len(SPECIAL)), min_frequency=2,
                                  special_tokens=list(SPECIAL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((clean_prompt(c) for c in captions), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=UNK_TOKEN, padding_side="right")


def load_tokenizer(folder: str | Path):
    """A tokenizer saved by `DemoTextEncoder.save_tokenizer` (a checkpoint's or a run's `tokenizer/`)."""
    from transformers import PreTrainedTokenizerFast

    if not (Path(folder) / "tokenizer.json").is_file():
        raise UserError(f"'{folder}' holds no tokenizer.json: the demo text tower's tokenizer is missing")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


class DemoTextEncoder(nn.Module):
    """`encode(prompts) -> (embeds B×max_tokens×dim, mask B×max_tokens bool)`, trainable.

    Prompts are cleaned, tokenised by `tokenizer` (`<s>` first), cut or right-padded to
    `max_tokens`; `truncated` counts the prompts cut so far. `model` is the DistilBERT encoder
    (`dim` wide, `layers` deep, 4 × `dim` MLP, no dropout); its last hidden state is the output,
    zero at padded positions.
    """

    trainable = True

    def __init__(self, tokenizer, dim: int = 128, max_tokens: int = 16, layers: int = 2, heads: int = 4) -> None:
        from transformers import DistilBertConfig, DistilBertModel

        super().__init__()
        if dim % heads:
            raise UserError(f"text.dim={dim} must be a multiple of {heads} (the demo tower's attention heads)")
        self.tokenizer, self.dim, self.max_tokens = tokenizer, dim, max_tokens
        self.truncated = 0
        config = DistilBertConfig(vocab_size=len(tokenizer), dim=dim, n_layers=layers, n_heads=heads,
                                  hidden_dim=4 * dim, dropout=0.0, attention_dropout=0.0, qa_dropout=0.0,
                                  seq_classif_dropout=0.0, max_position_embeddings=max_tokens, pad_token_id=PAD)
        self.model = DistilBertModel(config)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word_embeddings.weight.device

    def save_tokenizer(self, folder: str | Path) -> None:
        """The tokenizer as a transformers tokenizer folder (what a diffusers pipeline loads)."""
        self.tokenizer.save_pretrained(str(folder))

    def checkpoint_files(self) -> dict[str, str]:
        """`tokenizer/<file>` → text: what every checkpoint of a run carries, so it samples, exports
        and starts other runs with the vocabulary its weights were trained on."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_tokenizer(tmp)
            return {f"tokenizer/{f.name}": f.read_text() for f in sorted(Path(tmp).iterdir()) if f.is_file()}

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids B×max_tokens long, mask B×max_tokens bool) on the module's device."""
        cleaned = [clean_prompt(p) for p in prompts]
        self.truncated += sum(len(ids) > self.max_tokens for ids in self.tokenizer(cleaned)["input_ids"])
        batch = self.tokenizer(cleaned, padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        return to_device(batch["input_ids"], self.device), to_device(batch["attention_mask"].bool(), self.device)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden.masked_fill(~mask.unsqueeze(-1), 0.0), mask

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(prompts)
