"""Feature extractors through the real loaders on tiny random models, and the reference cache."""

import string

import numpy as np
import pytest
import torch

import daybreak  # noqa: F401  (makes torchvision importable before transformers needs it)
from daybreak.config import EvalConfig
from daybreak.errors import UserError
from daybreak.evaluate.features import (
    ClipFeatures,
    DinoFeatures,
    InceptionFeatures,
    ReferenceStats,
    TinyFeatures,
    build_extractor,
    weights_fingerprint,
)
from daybreak.metrics import feature_stats


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("clip")
    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab[token] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    torch.manual_seed(0)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            tiny, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1
        ),
        vision_config=dict(tiny, image_size=28, patch_size=14),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import AutoModel, Dinov2WithRegistersConfig

    path = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        patch_size=14, image_size=28, num_register_tokens=4,
    )
    AutoModel.from_config(config).save_pretrained(path)
    return path


def test_clip_image_features_match_reference_pipeline(clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel

    images = _images(5, 28)
    feats = ClipFeatures(clip_dir, batch_size=2)(images)
    assert feats.shape == (5, 8) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5))
    # images already at the model's 28² input: the processor only rescales and normalises
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False)
    pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        expected = torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ClipFeatures(clip_dir)(images.float() / 255), feats)


def test_clip_resizes_other_resolutions_and_encodes_text(clip_dir):
    clip = ClipFeatures(clip_dir)
    assert clip(_images(3, 40)).shape == (3, 8)
    text = clip.encode_text(["a red circle", "a blue square on the left", "a red circle"])
    assert text.shape == (3, 8)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text[0], text[2])
    assert not torch.allclose(text[0], text[1])


def test_dino_features_are_normalised_cls_tokens(dino_dir):
    from transformers import AutoModel

    images = _images(4, 28, seed=1)
    dino = DinoFeatures(dino_dir, resolution=28, batch_size=3)
    feats = dino(images)
    assert feats.shape == (4, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(dino(images), feats)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = AutoModel.from_pretrained(dino_dir).eval()
    with torch.no_grad():
        cls = model(pixel_values=(images / 255 - mean) / std).last_hidden_state[:, 0]
    torch.testing.assert_close(feats, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5, rtol=1e-5)
    assert DinoFeatures(dino_dir, resolution=42)(_images(2, 64)).shape == (2, 16)


def test_missing_weights_name_the_config_key(tmp_path):
    with pytest.raises(UserError, match=r"eval\.clip_path.*clip-vit-large-patch14-336"):
        ClipFeatures(tmp_path / "nope")
    with pytest.raises(UserError, match=r"eval\.dino_path.*dinov2-with-registers-large"):
        DinoFeatures(tmp_path / "nope")
    with pytest.raises(UserError, match=r"eval\.inception_path.*pt_inception-2015-12-05"):
        InceptionFeatures(tmp_path / "nope.pth")
    with pytest.raises(UserError, match=r"eval\.clip_path is not set"):
        build_extractor("clip", EvalConfig())
    with pytest.raises(UserError, match="unknown feature extractor"):
        build_extractor("vgg", EvalConfig())


def test_inception_with_random_weights_in_the_expected_format(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # the library always loads weights in __init__: build it once with loading disabled to get a
    # randomly initialised state dict in the real format, then load that through daybreak
    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        reference = tf_inception.FeatureExtractorInceptionV3("ref", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), weights)
    images = _images(1, 64, seed=2)  # one image: Inception always runs at 299², slow on CPU
    inception = build_extractor("inception", EvalConfig(inception_path=str(weights)))
    feats = inception(images.float() / 255)
    assert feats.shape == (1, 2048)
    torch.testing.assert_close(feats, reference(images)[0])
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"eval\.inception_path"):
        InceptionFeatures(tmp_path / "bad.pth")


def test_tiny_features_are_fixed_by_seed():
    images = _images(6, 32)
    a = TinyFeatures(seed=3, dim=12)(images)
    assert a.shape == (6, 12) and torch.isfinite(a).all()
    torch.manual_seed(123)  # the global RNG plays no part
    torch.testing.assert_close(TinyFeatures(seed=3, dim=12, batch_size=4)(images), a)
    assert not torch.allclose(TinyFeatures(seed=4, dim=12)(images), a)
    assert a.std(dim=0).min() > 0  # features vary across images, so FD is informative


class _Counting(TinyFeatures):
    calls = 0

    def __call__(self, images):
        type(self).calls += 1
        return super().__call__(images)


def test_reference_stats_cache_hits_without_extracting(tmp_path):
    batches = [_images(4, 32, seed=s) for s in range(3)]
    extractor = _Counting(dim=8)
    first = ReferenceStats.load_or_compute(extractor, batches, "demo:n=12", tmp_path)
    assert _Counting.calls == 3
    assert len(list(tmp_path.glob("tiny-*.npz"))) == 1
    second = ReferenceStats.load_or_compute(extractor, iter(()), "demo:n=12", tmp_path)
    assert _Counting.calls == 3
    for field in ("features", "mu", "sigma"):
        np.testing.assert_array_equal(getattr(second, field), getattr(first, field))
    mu, sigma = feature_stats(extractor(torch.cat(batches)))
    np.testing.assert_allclose(first.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(first.sigma, sigma, rtol=1e-6, atol=1e-9)
    ReferenceStats.load_or_compute(extractor, batches[:1], "demo:n=4", tmp_path)
    ReferenceStats.load_or_compute(_Counting(seed=1, dim=8), batches[:1], "demo:n=4", tmp_path)
    assert len(list(tmp_path.glob("tiny-*.npz"))) == 3


def test_weights_fingerprint_follows_content_not_location(tmp_path):
    for name, payload in [("a", b"x" * 100), ("b", b"x" * 100), ("c", b"x" * 99 + b"y")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(payload)
    (tmp_path / "b" / ".cache").mkdir()
    (tmp_path / "b" / ".cache" / "download.metadata").write_text("fetched at some time")
    a, b, c = (weights_fingerprint(tmp_path / n) for n in "abc")
    assert a == b != c
    file_a, file_c = (weights_fingerprint(tmp_path / n / "model.safetensors") for n in "ac")
    assert file_a != file_c
