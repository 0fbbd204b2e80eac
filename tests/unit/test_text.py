import pytest
import torch

from daybreak.errors import UserError
from daybreak.text import TextEncoder, build_text_encoder, clean_prompt
from daybreak.text.demo import BOS, PAD, UNK, DemoTextEncoder


def test_clean_prompt():
    messy = "  A  RED&amp;Blue\tcircle https://x.com/a <b>now</b> @bob "
    assert clean_prompt(messy) == "a red&blue circle now"


def test_tokenize_bos_first_padding_and_unknown_words():
    enc = DemoTextEncoder(max_tokens=8)
    ids, mask = enc.tokenize(["A Red circle, on the LEFT!", "", "a zebra"])
    assert ids.shape == mask.shape == (3, 8) and mask.dtype == torch.bool
    assert (ids[:, 0] == BOS).all()
    assert mask.sum(1).tolist() == [7, 1, 3]
    assert ids[2, 2].item() == UNK
    assert (ids[~mask] == PAD).all()
    assert torch.equal(ids[0], enc.tokenize(["a red circle on the left"])[0][0])


def test_truncation_is_counted():
    enc = DemoTextEncoder(max_tokens=4)
    ids, mask = enc.tokenize(["a small red circle on the left", "a red"])
    assert mask.all(dim=1).tolist() == [True, False] and enc.truncated == 1


def test_encode_shapes_mask_and_padding_independence():
    torch.manual_seed(0)
    enc = DemoTextEncoder(dim=32, max_tokens=12)
    embeds, mask = enc.encode(["a red circle on the left", ""])
    assert embeds.shape == (2, 12, 32) and embeds.dtype == torch.float32
    assert (embeds[~mask] == 0).all() and embeds[0, :7].abs().sum() > 0
    alone, _ = enc.encode(["a red circle on the left"])
    torch.testing.assert_close(alone[0], embeds[0])  # padding in the batch does not leak in
    other, _ = enc.encode(["a blue circle on the left"])
    assert not torch.allclose(other[0], embeds[0])


def test_trainable_and_gradients_flow():
    enc = DemoTextEncoder(dim=16)
    assert isinstance(enc, TextEncoder) and enc.trainable
    embeds, _ = enc.encode(["a green square on the top"])
    embeds.sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def test_factory():
    enc = build_text_encoder("demo", dim=24, max_tokens=10)
    assert isinstance(enc, DemoTextEncoder) and enc.dim == 24 and enc.max_tokens == 10
    with pytest.raises(UserError, match="text.kind"):
        build_text_encoder("bert")
