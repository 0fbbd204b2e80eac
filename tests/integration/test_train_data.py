"""The tiny config trains from every data format, in pixel and latent space, with a plain and a
cached pretrained text tower; `daybreak cache latents | text` fill caches that training then reads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import TEMPLATES, save_tokenizer, tiny_model, tiny_vae

from daybreak.precompute import cache_latents, cache_text
from daybreak.config import load_config
from daybreak.data.tools import convert
from daybreak.errors import UserError
from daybreak.build import build_text
from daybreak.space import CachedLatentSpace, build_space
from daybreak.text.hf import HFTextEncoder
from daybreak.run import train

CAPTIONS = ["a red circle on the left", "a blue square on the right", "a circle", "the red square"]
LATENTS = ["model.in_channels=4", "model.patch_size=2", "model.bottleneck_size=null", "space.kind=latents"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 valid 32×32 noise JPEG/PNG + .txt pairs (and, in `bad`, a truncated JPEG and a text file
    named .png), the valid ones converted to hf, webdataset and mds; a tiny VAE and T5 on disk."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    good = root / "imagefolder"
    for i in range(8):
        path = good / f"part{i % 2}" / f"img{i}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(CAPTIONS[i % 4])
    paths = {"imagefolder": good}
    for fmt in ("hf", "webdataset", "mds"):
        paths[fmt] = root / fmt
        assert convert(good, paths[fmt], format=fmt, shard_size=5)["written"] == 8
    jpeg = (good / "part1" / "img1.jpg").read_bytes()
    (good / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 3 // 4])
    (good / "cut.txt").write_text("a red circle")
    (good / "fake.png").write_text("not an image")
    (good / "fake.txt").write_text("a blue square")
    tiny_vae().save_pretrained(root / "vae")
    tiny_model("t5").save_pretrained(root / "t5")
    save_tokenizer(root / "t5", TEMPLATES["t5"])
    return {"root": root, "data": paths, "vae": root / "vae", "t5": root / "t5"}


def config(world, name: str, fmt: str, *extra: str):
    return load_config("tiny", [
        f"run.dir={world['root'] / 'runs' / name}", f"data.source={fmt}", f"data.path={world['data'][fmt]}",
        "train.steps=2", "train.global_batch=4", "train.micro_batch=4", "train.checkpoint_every=2",
        "train.log_every=1", "sample.prompts=[]", *extra,
    ])


def metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]


def trained(cfg) -> list[dict]:
    final = train(cfg, progress=False)
    assert (final / "transformer.safetensors").is_file()
    rows = metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    return rows


def test_imagefolder_pixels_demo_text_skips_bad_files(world):
    # 2 steps × 4 = the 8 valid images; at seed 1 epoch 0's order ends on a valid one, so the
    # run reads the whole epoch, both bad files included, and nothing of the next
    rows = trained(config(world, "folder", "imagefolder", "seed=1"))
    assert rows[-1]["skipped/total"] == 2
    assert rows[-1]["skipped/truncated"] == 1 and rows[-1]["skipped/not_image"] == 1


def test_hf_latents_uncached_t5(world):
    cfg = config(world, "hf", "hf", *LATENTS, f"space.vae_path={world['vae']}", "text.kind=t5",
                 f"text.path={world['t5']}", "text.max_tokens=8")
    trained(cfg)


def test_webdataset_pixels_cached_t5_reads_only_the_cache(world, monkeypatch):
    text = ["text.kind=t5", f"text.path={world['t5']}", "text.max_tokens=8"]
    cache_dir = world["root"] / "text-cache"
    cfg = config(world, "wds", "webdataset", *text, f"text.cache_dir={cache_dir}")
    assert cache_text(cfg, progress=False) == len(CAPTIONS) + 1  # and the empty caption
    assert cache_text(cfg, progress=False) == 0

    plain = build_text(config(world, "wds", "webdataset", *text))
    cached = build_text(cfg)
    prompts = ["", *CAPTIONS, "A RED circle on the left"]
    expected = plain.encode(prompts)

    def fail(self, prompts):
        raise AssertionError(f"the text tower ran on cached captions: {prompts}")

    monkeypatch.setattr(HFTextEncoder, "encode", fail)
    got = cached.encode(prompts)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    trained(cfg)


def test_mds_latents_cached(world, monkeypatch):
    cache_dir = world["root"] / "latent-cache"
    cfg = config(world, "mds", "mds", *LATENTS, f"space.vae_path={world['vae']}", f"space.cache_dir={cache_dir}")
    assert cache_latents(cfg, progress=False) == 8
    files = sorted(cache_dir.rglob("*.safetensors"))
    assert len(files) == 8

    space = build_space(cfg.space)
    assert isinstance(space, CachedLatentSpace)
    monkeypatch.setattr(type(space.vae), "encode", lambda *a, **k: pytest.fail("VAE ran on a cached latent"))
    assert cache_latents(cfg, progress=False) == 0
    monkeypatch.undo()
    trained(cfg)
    assert sorted(cache_dir.rglob("*.safetensors")) == files


def test_cache_commands_need_their_config(world):
    with pytest.raises(UserError, match="space.kind=latents and space.cache_dir"):
        cache_latents(config(world, "x", "mds"))
    with pytest.raises(UserError, match="text.cache_dir"):
        cache_text(config(world, "x", "mds"))
    with pytest.raises(UserError, match="cannot be cached"):
        cache_text(config(world, "x", "mds", f"text.cache_dir={world['root'] / 'nope'}"))


def test_cached_text_read_in_loader_workers_trains_bitwise_like_encode(world, monkeypatch):
    """The loader's workers read the text cache (`CaptionLookup`); the step selects the null caption
    where dropout drops one: the same weights, bit for bit, as the step calling `CachedTextEncoder.encode`,
    with 0 and 1 workers, and with a cache that starts empty (the workers miss, the step encodes)."""
    from safetensors.torch import load_file

    from daybreak.build import build_denoiser
    from daybreak.text.cache import CachedTextEncoder

    text = ["text.kind=t5", f"text.path={world['t5']}", "text.max_tokens=8", "objective.caption_dropout=0.5"]

    def run(name, cache, *extra):
        cfg = load_config("tiny", [f"run.dir={world['root'] / 'runs' / ('lookup-' + name)}", "data.source=mds",
                                   f"data.path={world['data']['mds']}", "train.steps=2", "train.global_batch=4",
                                   "train.micro_batch=2", "train.checkpoint_every=2", "train.log_every=1",
                                   "sample.prompts=[]", *text, f"text.cache_dir={world['root'] / cache}", *extra])
        return cfg, lambda: load_file(train(cfg, progress=False) / "transformer.safetensors")

    cfg, go = run("encode", "lookup-cache")
    keep = build_denoiser(cfg).draws(range(8), (1,), torch.device("cpu"))[0]
    assert 0 < keep.sum() < 8  # both branches of the selection are taken
    assert cache_text(cfg, progress=False) == len(CAPTIONS) + 1
    with monkeypatch.context() as m:
        m.delattr(CachedTextEncoder, "loader_hook")  # today's path: the step reads the cache
        expected = go()

    encoded = []
    real_encode = CachedTextEncoder.encode
    monkeypatch.setattr(CachedTextEncoder, "encode", lambda self, p: encoded.append(p) or real_encode(self, p))
    for workers in (0, 1):
        encoded.clear()
        with monkeypatch.context() as m:
            m.setattr(HFTextEncoder, "encode", lambda self, p: pytest.fail(f"the text tower ran on {p}"))
            got = run(f"w{workers}", "lookup-cache", f"data.num_workers={workers}")[1]()
        assert encoded == [[""]]  # the null caption, once; every batch's captions came from the workers
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    encoded.clear()
    got = run("miss", "lookup-empty", "data.num_workers=1")[1]()  # misses fall back to the step's encode
    assert encoded[0] != [""]  # step 1's captions, encoded by the step
    assert all(torch.equal(got[k], expected[k]) for k in got)
