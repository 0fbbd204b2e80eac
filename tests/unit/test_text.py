import pytest
import torch

from daybreak.data.shapes import ShapesDataset
from daybreak.errors import UserError
from daybreak.text import TextConfig, TextEncoder, build_text_encoder, clean_prompt
from daybreak.text.demo import BOS, PAD, UNK, DemoTextEncoder, load_tokenizer, train_tokenizer

CAPTIONS = [c for i in range(300) for c in ShapesDataset(seed=3).captions(i).values()]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS)


def test_clean_prompt():
    messy = "  A  RED&amp;Blue\tcircle https://x.com/a <b>now</b> @bob "
    assert clean_prompt(messy) == "a red&blue circle now"


def test_tokenizer_is_learned_from_the_captions(tokenizer):
    words = {w for c in CAPTIONS for w in c.replace(",", " ").split()}
    # every training word is one token (they all repeat), and the vocabulary stops there: 256 bytes,
    # 3 special tokens and the merges that build those words, far below the 8192 allowed
    for word in words:
        assert len(tokenizer(word)["input_ids"]) == 2, word  # <s> + the word
    assert 256 + 3 + len(words) <= len(tokenizer) < 256 + 3 + 8 * len(words)
    assert tokenizer.convert_ids_to_tokens([PAD, BOS, UNK]) == ["<pad>", "<s>", "<unk>"]


def test_unseen_words_become_known_pieces_never_unk(tokenizer):
    ids = tokenizer("a zorblax quux, 🦊")["input_ids"]
    assert ids[0] == BOS and UNK not in ids and len(ids) > 4
    assert tokenizer.decode(ids[1:]) == " a zorblax quux, 🦊"


def test_the_tokenizer_cleans_like_clean_prompt(tokenizer):
    messy = "  A  RED\tcircle https://x.com/a <b>on</b> @bob the LEFT "
    assert tokenizer(messy)["input_ids"] == tokenizer(clean_prompt(messy))["input_ids"]


def test_tokenize_bos_first_padding_and_truncation(tokenizer):
    enc = DemoTextEncoder(tokenizer, dim=16, max_tokens=8)
    ids, mask = enc.tokenize(["A Red circle, on the LEFT!", "", "a small red circle on the left, on a plain black background"])
    assert ids.shape == mask.shape == (3, 8) and mask.dtype == torch.bool
    assert (ids[:, 0] == BOS).all() and (ids[~mask] == PAD).all()
    assert mask.sum(1).tolist() == [8, 1, 8]  # <s> a red circle , on the left ! → cut at 8
    assert enc.truncated == 2
    assert torch.equal(ids[0, :7], enc.tokenize(["a red circle, on the left"])[0][0, :7])


def test_encode_shapes_mask_and_padding_independence(tokenizer):
    torch.manual_seed(0)
    enc = DemoTextEncoder(tokenizer, dim=32, max_tokens=12)
    embeds, mask = enc.encode(["a red circle on the left", ""])
    assert embeds.shape == (2, 12, 32) and embeds.dtype == torch.float32
    assert (embeds[~mask] == 0).all() and embeds[0, :7].abs().sum() > 0
    alone, _ = enc.encode(["a red circle on the left"])
    torch.testing.assert_close(alone[0], embeds[0])  # padding in the batch does not leak in
    other, _ = enc.encode(["a blue circle on the left"])
    assert not torch.allclose(other[0], embeds[0])


def test_trainable_gradients_and_tokenizer_round_trip(tokenizer, tmp_path):
    enc = DemoTextEncoder(tokenizer, dim=16)
    assert isinstance(enc, TextEncoder) and enc.trainable
    embeds, _ = enc.encode(["a green square on the top"])
    embeds.sum().backward()
    grad = enc.model.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    for name, text in enc.checkpoint_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    again = load_tokenizer(tmp_path / "tokenizer")
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again("a zorblax on the left")["input_ids"] == tokenizer("a zorblax on the left")["input_ids"]
    with pytest.raises(UserError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_factory(tokenizer):
    enc = build_text_encoder(TextConfig(dim=24, max_tokens=10), tokenizer=tokenizer)
    assert isinstance(enc, DemoTextEncoder) and enc.dim == 24 and enc.max_tokens == 10
    assert enc.model.config.vocab_size == len(tokenizer)
    with pytest.raises(UserError, match="text.kind"):
        build_text_encoder(TextConfig(kind="bert"))
