"""Pixel and latent spaces, and the latent cache: hits are the stored bits and skip the VAE."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import daybreak  # noqa: F401  (torchvision fix before diffusers imports it)
from daybreak.errors import UserError
from daybreak.space import CachedLatentSpace, LatentCache, LatentSpace, PixelSpace, build_space, downscale_of
from helpers import tiny_dc_ae, tiny_flux2_vae, tiny_vae


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return str(path)


def pixels(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def forbid_vae(space: LatentSpace, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the VAE encoder ran on a cache hit")

    monkeypatch.setattr(space.vae, "encode", fail)


def test_latent_space_shapes_and_frozen_vae_outside_state_dict(vae_path):
    space = build_space(SimpleNamespace(kind="latents", vae_path=vae_path, cache_dir=None, scale=None, shift=None))
    assert isinstance(space, LatentSpace) and (space.channels, space.downscale) == (4, 2)
    z = space.encode(pixels(2))
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    assert space.decode(z).shape == (2, 3, 32, 32)
    assert not any(p.requires_grad for p in space.vae.parameters()) and space.state_dict() == {}
    assert isinstance(build_space(SimpleNamespace(kind="pixels", cache_dir=None)), PixelSpace)


def test_cache_round_trip_is_bit_identical_and_skips_the_vae(tmp_path, vae_path, monkeypatch):
    cfg = SimpleNamespace(kind="latents", vae_path=vae_path, cache_dir=str(tmp_path), scale=None, shift=None)
    plain = build_space(SimpleNamespace(kind="latents", vae_path=vae_path, cache_dir=None, scale=None, shift=None))
    cached = build_space(cfg)
    assert isinstance(cached, CachedLatentSpace) and cached.channels == 4 and cached.downscale == 2
    x, keys = pixels(4), ["a", "b", "c", "d"]
    expected = plain.encode(x)
    assert torch.equal(cached.encode(x, keys), expected) and cached.encoded == 4
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 4

    forbid_vae(cached.space, monkeypatch)
    again = cached.encode(x[[3, 1, 0, 2]], ["d", "b", "a", "c"])
    assert torch.equal(again, expected[[3, 1, 0, 2]]) and cached.encoded == 4
    assert sorted(tmp_path.rglob("*.safetensors")) == files
    monkeypatch.undo()

    # a new key, and a known key at another bucket size, are misses; only they reach the VAE
    mixed = cached.encode(torch.cat([x[:1], pixels(1, seed=1)]), ["a", "e"])
    assert torch.equal(mixed[0], expected[0]) and cached.encoded == 5
    wide = cached.encode(pixels(1, 16, 32), ["a"])
    assert wide.shape == (1, 4, 8, 16) and cached.encoded == 6
    assert len(list(tmp_path.rglob("*.safetensors"))) == 6


def test_without_keys_the_cache_is_bypassed(tmp_path, vae_path):
    space = build_space(SimpleNamespace(kind="latents", vae_path=vae_path, cache_dir=str(tmp_path), scale=None,
                                        shift=None))
    x = pixels(2)
    assert torch.equal(space.encode(x), space.space.encode(x)) and space.encoded == 2
    assert not list(tmp_path.rglob("*.safetensors"))
    with pytest.raises(ValueError, match="3 keys"):
        space.encode(x, ["a", "b", "c"])


def test_bf16_vae_latents_are_stored_in_bf16_losslessly(tmp_path):
    space = LatentSpace(tiny_vae(torch.bfloat16))
    cached = CachedLatentSpace(space, LatentCache(tmp_path, space.fingerprint()))
    x = pixels(2)
    assert torch.equal(cached.encode(x, ["a", "b"]), space.encode(x))
    stored = [load_file(f)["latent"] for f in (tmp_path / space.fingerprint()).rglob("*.safetensors")]
    assert len(stored) == 2 and all(t.dtype == torch.bfloat16 for t in stored)


def test_fingerprint_follows_weights_and_dtype():
    a, b = LatentSpace(tiny_vae()), LatentSpace(tiny_vae())
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        next(b.vae.parameters()).add_(1e-3)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != LatentSpace(tiny_vae(torch.bfloat16)).fingerprint()


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="needs space.kind=latents"):
        build_space(SimpleNamespace(kind="pixels", cache_dir=str(tmp_path)))
    with pytest.raises(UserError, match="needs space.vae_path"):
        build_space(SimpleNamespace(kind="latents", vae_path=None, cache_dir=None, scale=None, shift=None))
    with pytest.raises(UserError, match="does not exist"):
        build_space(SimpleNamespace(kind="latents", vae_path=str(tmp_path / "nowhere"), cache_dir=None, scale=None,
                                    shift=None))
    with pytest.raises(UserError, match="cannot load"):
        build_space(SimpleNamespace(kind="latents", vae_path=str(tmp_path), cache_dir=None, scale=None, shift=None))


@pytest.mark.parametrize("make, name", [(tiny_flux2_vae, "AutoencoderKLFlux2"), (tiny_dc_ae, "AutoencoderDC")])
def test_flux2_and_dc_ae_load_by_their_config_class(tmp_path, make, name):
    """The class comes from config.json; latents = (z - shift) * scale with the config's factors unless set,
    z the KL posterior's mode (FLUX.2) or DC-AE's deterministic latent, computed here with the class itself."""
    vae = make()
    vae.save_pretrained(tmp_path / "vae")
    cfg = dict(kind="latents", vae_path=str(tmp_path / "vae"), cache_dir=None, scale=None, shift=None)
    space = build_space(SimpleNamespace(**cfg))
    assert type(space.vae).__name__ == name and (space.channels, space.downscale) == (4, 2)
    assert downscale_of(SimpleNamespace(**cfg)) == 2
    x = pixels(2)
    with torch.no_grad():
        out = vae.eval().encode(x)
        z = out.latent_dist.mode() if name == "AutoencoderKLFlux2" else out.latent
    if name == "AutoencoderDC":  # SANA's DC-AE config holds its scaling factor and no shift
        assert (space.scale, space.shift) == (0.41407, 0.0)
        torch.testing.assert_close(space.encode(x), z * 0.41407)
    else:  # FLUX.2's config holds neither: 1 and 0 unless space.scale / space.shift say (PRX: 0.18215, 0)
        assert (space.scale, space.shift) == (1.0, 0.0)
        torch.testing.assert_close(space.encode(x), z)
    prx = build_space(SimpleNamespace(**{**cfg, "scale": 0.18215, "shift": 0.1}))
    torch.testing.assert_close(prx.encode(x), (z - 0.1) * 0.18215)
    assert prx.decode(prx.encode(x)).shape == (2, 3, 32, 32)
    torch.testing.assert_close(prx.decode(prx.encode(x)), space.decode(space.encode(x)), atol=1e-5, rtol=1e-5)

    # cached like the FLUX VAE; a scale the config does not hold is part of the cache's name
    cached = build_space(SimpleNamespace(**{**cfg, "cache_dir": str(tmp_path / "cache")}))
    assert torch.equal(cached.encode(x, ["a", "b"]), space.encode(x)) and cached.encoded == 2
    assert torch.equal(cached.encode(x, ["a", "b"]), space.encode(x)) and cached.encoded == 2
    assert prx.fingerprint() != space.fingerprint()


def test_other_vae_classes_are_refused_in_one_line(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(4,), decoder_block_out_channels=(4,), num_encoder_blocks=(1,),
                    num_decoder_blocks=(1,), latent_channels=4).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="holds a AutoencoderTiny; a latent space takes AutoencoderKL"):
        build_space(SimpleNamespace(kind="latents", vae_path=str(tmp_path), cache_dir=None, scale=None, shift=None))
