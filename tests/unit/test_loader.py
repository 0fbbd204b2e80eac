"""The loader: one bucket per batch, exact resume, disjoint rank slices, caption mixing, bad data."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daybreak.data import CaptionMixer, SkipSample, BucketLoader, open_source
from daybreak.errors import UserError

BUCKETS = [(32, 64), (48, 48), (64, 32)]
COLUMNS = ["short", "long"]  # the caption columns make_folder writes


def make_folder(root: Path, n: int = 24, captions: bool = True) -> Path:
    """n noise PNGs cycling through 60×30, 40×40 and 30×60 (width×height), with short/long captions."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        w, h = [(60, 30), (40, 40), (30, 60)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        if captions:
            (root / f"{i:03d}.json").write_text(json.dumps({"short": f"s{i}", "long": f"long {i}"}))
    return root


def loader(src, **kw):
    args = dict(batch_size=4, buckets=BUCKETS, caption_mixer=CaptionMixer({"short": 0.5, "long": 0.5}, seed=3), seed=7)
    return BucketLoader(src, **(args | kw))


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_hold_one_bucket_and_valid_captions(tmp_path):
    src = open_source("imagefolder", make_folder(tmp_path / "f"), caption_columns=COLUMNS)
    batches = take(iter(loader(src)), 9)  # 24 examples → 6 per epoch; crosses two epochs
    for b in batches:
        assert b["pixels"].shape[0] == 4 and tuple(b["pixels"].shape[2:]) in BUCKETS
        assert b["pixels"].dtype == torch.uint8  # bytes: converted to [-1, 1] on the device
        for key, cap in zip(b["keys"], b["captions"]):
            assert cap in (f"s{int(key)}", f"long {int(key)}")
        # 60×30 images land in the 32×64 bucket, 30×60 in 64×32
        expected = {0: (32, 64), 1: (48, 48), 2: (64, 32)}
        assert {expected[int(k) % 3] for k in b["keys"]} == {tuple(b["pixels"].shape[2:])}
    first_epoch = [k for b in batches[:6] for k in b["keys"]]
    assert sorted(first_epoch) == [f"{i:03d}" for i in range(24)]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(tmp_path, workers):
    src = open_source("imagefolder", make_folder(tmp_path / "f", n=20), caption_columns=COLUMNS)
    straight = take(iter(loader(src, num_workers=workers)), 7)
    first = loader(src, num_workers=workers)
    part = take(iter(first), 3)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    second = loader(src, num_workers=workers)
    second.load_state_dict(state)
    resumed = part + take(iter(second), 4)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight]
    assert [b["captions"] for b in resumed] == [b["captions"] for b in straight]
    for a, b in zip(resumed, straight):
        assert torch.equal(a["pixels"], b["pixels"])


def _key_numbers(batch: dict) -> dict:
    """A batch hook (the text cache's lookup stands in the trainer): a tensor computed from the batch."""
    batch["numbers"] = torch.tensor([int(k) for k in batch["keys"]])
    return batch


@pytest.mark.parametrize("workers", [0, 1])
def test_batch_hook_adds_tensors_and_leaves_the_sampler_alone(tmp_path, workers):
    src = open_source("imagefolder", make_folder(tmp_path / "f", n=20), caption_columns=COLUMNS)
    plain = loader(src, num_workers=workers)
    hooked = loader(src, num_workers=workers, batch_hook=_key_numbers)
    a, b = take(iter(plain), 3), take(iter(hooked), 3)
    assert [x["keys"] for x in a] == [x["keys"] for x in b] and [x["captions"] for x in a] == [x["captions"] for x in b]
    assert all(torch.equal(x["numbers"], torch.tensor([int(k) for k in x["keys"]])) for x in b)
    assert "numbers" not in a[0]
    assert plain.state_dict() == hooked.state_dict()  # resume is unchanged by the hook


def test_ranks_split_each_global_batch(tmp_path):
    src = open_source("imagefolder", make_folder(tmp_path / "f"), caption_columns=COLUMNS)
    whole = take(iter(loader(src, batch_size=4)), 5)
    ranks = [take(iter(loader(src, batch_size=2, rank=r, world_size=2)), 5) for r in range(2)]
    for step, g in enumerate(whole):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert r0["pixels"].shape == r1["pixels"].shape == (2, *g["pixels"].shape[1:])
        assert not set(r0["keys"]) & set(r1["keys"])
        assert r0["keys"] + r1["keys"] == g["keys"]
        assert torch.equal(torch.cat([r0["pixels"], r1["pixels"]]), g["pixels"])


def test_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    folder = make_folder(tmp_path / "f", n=12)
    noise = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "bad1.jpg")
    jpeg = (folder / "bad1.jpg").read_bytes()
    (folder / "bad1.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "bad2.png").write_bytes(b"not a png at all")
    for name in ("bad1", "bad2"):
        (folder / f"{name}.txt").write_text("a caption")
    ld = loader(src := open_source("imagefolder", folder, caption_columns=COLUMNS), batch_size=2)
    assert len(src) == 14
    keys = [k for b in take(iter(ld), 6) for k in b["keys"]]  # the 12 valid ones, one epoch
    assert sorted(keys) == [f"{i:03d}" for i in range(12)]
    stats = ld.stats()
    assert stats["skipped/total"] == 2
    assert stats["skipped/truncated"] == 1 and stats["skipped/not_image"] == 1
    assert "bad1" in caplog.text and "bad2" in caplog.text


def test_missing_captions_are_skipped(tmp_path):
    folder = make_folder(tmp_path / "f", n=9, captions=False)
    for i in range(6):
        (folder / f"{i:03d}.txt").write_text(f"cap {i}")
    ld = loader(open_source("imagefolder", folder), batch_size=1, caption_mixer=CaptionMixer(seed=0))
    keys = {k for b in take(iter(ld), 12) for k in b["keys"]}
    assert keys == {f"{i:03d}" for i in range(6)}
    assert ld.stats()["skipped/no_caption"] >= 3


class FlakyDecode:
    """A source whose probe passes but whose odd items fail to decode."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def probe(self, i):
        return self.inner.probe(i)

    def __getitem__(self, i):
        if i % 2:
            raise SkipSample("corrupt", f"item{i}")
        return self.inner[i]


def test_decode_failures_are_replaced_within_the_batch(tmp_path):
    ld = loader(FlakyDecode(open_source("shapes", size=32, length=16)), batch_size=4, buckets=[(32, 32)])
    batch = next(iter(ld))
    assert batch["pixels"].shape == (4, 3, 32, 32)
    assert all(int(k[-7:]) % 2 == 0 for k in batch["keys"])
    assert ld.stats()["replaced/corrupt"] == 4 - len(set(batch["keys"]))


def test_state_from_another_layout_is_refused(tmp_path):
    src = open_source("shapes", size=32, length=16)
    state = loader(src, buckets=[(32, 32)]).state_dict()
    with pytest.raises(UserError, match="global_batch"):
        loader(src, buckets=[(32, 32)], batch_size=8).load_state_dict(state)


def test_caption_mixer_frequencies_and_renormalisation():
    mixer = CaptionMixer({"long": 0.7, "short": 0.3}, seed=1)
    both = {"long": "l", "short": "s"}
    picks = Counter(mixer.column(both, 0, i) for i in range(4000))
    assert abs(picks["long"] / 4000 - 0.7) < 0.03
    assert [mixer.column(both, 0, i) for i in range(50)] == [mixer.column(both, 0, i) for i in range(50)]
    assert [mixer.column(both, 0, i) for i in range(50)] != [mixer.column(both, 1, i) for i in range(50)]
    assert {mixer.column({"short": "s", "long": "  "}, 0, i) for i in range(100)} == {"short"}
    assert mixer.column({"other": "x"}, 0, 0) is None
    with pytest.raises(UserError):
        CaptionMixer({"a": -1.0})


class Counting:
    """An image folder source that counts its probes and decodes (thread-safe enough for counting)."""

    def __init__(self, inner):
        self.inner, self.probes, self.reads = inner, Counter(), Counter()

    def __len__(self):
        return len(self.inner)

    def probe(self, i):
        self.probes[i] += 1
        return self.inner.probe(i)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.inner[i]


def test_sizes_are_read_once_and_a_rank_reads_only_its_slice(tmp_path):
    src = open_source("imagefolder", make_folder(tmp_path / "f", n=24), caption_columns=COLUMNS)
    ranks = [Counting(src) for _ in range(2)]
    batches = [take(iter(loader(c, batch_size=2, rank=r, world_size=2)), 12) for r, c in enumerate(ranks)]
    for c in ranks:  # 12 steps of 4 images = two epochs; every example probed once, in the first step
        assert sorted(c.probes) == list(range(24)) and set(c.probes.values()) == {1}
        assert sum(c.reads.values()) == 12 * 2  # decodes: its own 2 images per step, no more
    # the same global batches as one rank with the whole batch: the rank split is unchanged
    whole = take(iter(loader(src, batch_size=4)), 12)
    assert [a["keys"] + b["keys"] for a, b in zip(*batches)] == [w["keys"] for w in whole]
