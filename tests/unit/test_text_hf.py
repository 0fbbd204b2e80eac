import pytest
import torch

import daybreak  # noqa: F401  (torchvision fix before transformers' model imports)
import transformers
from daybreak.errors import UserError
from daybreak.text import TextConfig, build_text_encoder
from daybreak.text.cache import CachedTextEncoder, TextEmbeddingCache, build_cache
from daybreak.text.demo import DemoTextEncoder, train_tokenizer
from daybreak.text.hf import HFTextEncoder
from helpers import TEMPLATES, WORDS, save_tokenizer, tiny_model, tiny_qwen3vl

PROMPTS = ["a red circle on the left", "A BLUE  square on the right", "", "a circle"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for kind, template in TEMPLATES.items():
        folder = tmp_path_factory.mktemp(kind)
        tiny_model(kind).save_pretrained(folder)
        save_tokenizer(folder, template)
        folders[kind] = folder
    return folders


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_loads_each_kind_frozen_with_masked_padding(checkpoints, kind):
    enc = HFTextEncoder(kind, str(checkpoints[kind]), max_tokens=8)
    assert enc.dim == 16 and not enc.trainable
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    embeds, mask = enc.encode(PROMPTS)
    assert embeds.shape == (4, 8, 16) and embeds.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.any(dim=1).all()  # "" keeps at least one valid token
    assert (embeds[~mask] == 0).all() and (embeds[mask].abs().sum(-1) > 0).all()
    assert mask[0].sum() > mask[3].sum()


def test_t5gemma_matches_the_encoder_of_the_full_checkpoint(checkpoints):
    enc = HFTextEncoder("t5gemma", str(checkpoints["t5gemma"]), max_tokens=8)
    full = transformers.T5GemmaForConditionalGeneration.from_pretrained(checkpoints["t5gemma"]).eval()
    ids, mask = enc.tokenize(PROMPTS)
    assert (ids[:, 0] == 2).all()  # the tokenizer's own <bos>
    with torch.no_grad():
        ref = full.get_encoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    embeds, _ = enc.encode(PROMPTS)
    torch.testing.assert_close(embeds[mask], ref[mask])


def test_hidden_state_index_picks_a_layer(checkpoints):
    path = str(checkpoints["causal-lm"])
    first = HFTextEncoder("causal-lm", path, max_tokens=8, hidden_state=1)
    last = HFTextEncoder("causal-lm", path, max_tokens=8)
    ids, mask = first.tokenize(PROMPTS)
    with torch.no_grad():
        out = first.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    states = out.hidden_states
    got, _ = first.encode(PROMPTS)
    torch.testing.assert_close(got[mask], states[1][mask])
    assert not torch.allclose(got, last.encode(PROMPTS)[0])
    assert first.fingerprint != last.fingerprint


def test_cleaning_lower_casing_and_truncation_count(checkpoints):
    enc = HFTextEncoder("t5", str(checkpoints["t5"]), max_tokens=4)
    a, mask_a = enc.encode(["A  RED circle"])
    b, mask_b = enc.encode(["a red circle"])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b) and enc.truncated == 0
    _, mask = enc.encode(["a red circle on the left", "a red"])
    assert enc.truncated == 1 and mask[0].all()


def test_missing_weights_name_the_config_key(tmp_path, checkpoints):
    with pytest.raises(UserError, match=r"text\.path .*does not exist.*t5gemma-2b-2b-ul2"):
        HFTextEncoder("t5gemma", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"text\.path is not set"):
        HFTextEncoder("clip")
    with pytest.raises(UserError, match=r"text\.path .*cannot load"):
        HFTextEncoder("t5", str(tmp_path))  # exists, but holds no checkpoint


def test_factory_builds_pretrained_kinds(checkpoints):
    enc = build_text_encoder(TextConfig(kind="clip", path=str(checkpoints["clip"]), max_tokens=8))
    assert isinstance(enc, HFTextEncoder) and enc.kind == "clip"


def test_cached_encoder_is_bit_identical_and_reads_hits(tmp_path, checkpoints):
    enc = HFTextEncoder("t5gemma", str(checkpoints["t5gemma"]), max_tokens=8)
    cached = CachedTextEncoder(enc, TextEmbeddingCache(tmp_path, enc.fingerprint))
    direct = enc.encode(PROMPTS)
    first = cached.encode(PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(first, direct))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(PROMPTS)

    def fail(prompts):
        raise AssertionError(f"encoder called on a cache hit: {prompts}")

    enc.encode = fail
    second = cached.encode(list(reversed(PROMPTS)) + ["a red circle on the left"])
    assert torch.equal(second[0][:4], direct[0].flip(0))
    assert torch.equal(second[1][:4], direct[1].flip(0))
    assert torch.equal(second[0][4], direct[0][0])
    assert sorted(tmp_path.rglob("*.safetensors")) == files


def test_cache_keys_depend_on_fingerprint_and_cleaned_caption(tmp_path):
    a, b = TextEmbeddingCache(tmp_path, "enc-a"), TextEmbeddingCache(tmp_path, "enc-b")
    a.put("A Red circle", torch.ones(3, 2), torch.tensor([True, True, False]))
    assert "a red circle" in a and "a red circle" not in b
    embeds, mask = a.get("a  red circle")
    assert torch.equal(embeds, torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert mask.tolist() == [True, True, False] and b.get("a red circle") is None


def test_build_cache_fills_once(tmp_path, checkpoints):
    enc = HFTextEncoder("t5", str(checkpoints["t5"]), max_tokens=8)
    captions = PROMPTS + ["a red circle on the left", "A red circle on the left"]
    assert build_cache(enc, captions, tmp_path, batch_size=2) == 4
    assert build_cache(enc, captions, tmp_path, batch_size=2) == 0
    cache = TextEmbeddingCache(tmp_path, enc.fingerprint)
    assert all(p in cache for p in PROMPTS)
    direct = enc.encode(PROMPTS[1:2])
    assert torch.equal(CachedTextEncoder(enc, cache).encode(PROMPTS[1:2])[1], direct[1])


def test_trainable_encoders_are_not_cached(tmp_path):
    with pytest.raises(ValueError, match="trainable"):
        CachedTextEncoder(DemoTextEncoder(train_tokenizer(["a red circle"])), TextEmbeddingCache(tmp_path, "demo"))


@pytest.fixture(scope="module")
def qwen3vl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3vl")
    tiny_qwen3vl().save_pretrained(folder)
    save_tokenizer(folder, None)
    return folder


def test_qwen3vl_is_the_text_backbone_of_the_vision_language_checkpoint(tmp_path, qwen3vl):
    """PRX's Qwen3-VL tower: Qwen3VLForConditionalGeneration's language model, last hidden state, the mask,
    case kept (PRX's skip_text_cleaning); checked against the whole model's own text-only forward."""
    enc = build_text_encoder(TextConfig(kind="qwen3vl", path=str(qwen3vl), max_tokens=8))
    assert type(enc.model).__name__ == "Qwen3VLTextModel" and enc.dim == 16 and enc.max_tokens == 8
    assert not any("visual" in name for name, _ in enc.named_parameters())
    assert all(not p.requires_grad for p in enc.parameters())
    prompts = ["a red circle on the &amp; left", "A red circle", "a red circle", ""]
    embeds, mask = enc.encode(prompts)
    ids, _ = enc.tokenize(prompts)
    # "&amp;" read as one "&" (three pieces unescaped), "A" kept upper-case (not in the vocabulary)
    assert mask.sum(1).tolist() == [7, 3, 3, 1] and ids[1, 0] == WORDS.index("<unk>") != ids[2, 0]
    full = transformers.Qwen3VLForConditionalGeneration.from_pretrained(qwen3vl).eval()
    with torch.no_grad():
        ref = full.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(embeds[mask], ref[mask])
    assert (embeds[~mask] == 0).all() and not torch.equal(embeds[1], embeds[2])  # "A" is not "a" here

    # the text cache keys captions by this tower's cleaning: case-different captions stay apart
    cached = CachedTextEncoder(enc, TextEmbeddingCache(tmp_path, enc.fingerprint, enc.clean))
    got = cached.encode(prompts)
    assert torch.equal(got[0], embeds) and len(list(tmp_path.rglob("*.safetensors"))) == 4
