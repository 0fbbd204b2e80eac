"""Bucket lists match the spec (and diffusers at 512), nearest-bucket choices are hand-checked."""

import numpy as np
import pytest
import torch
from PIL import Image

from daybreak.data import make_buckets, nearest_bucket, resolve_buckets, to_pixels, token_table
from daybreak.errors import UserError

# diffusers' ASPECT_RATIO_512_BIN ([height, width]) entries with aspect in [0.5, 2] that SPEC §2 lists.
SPEC_512 = [(352, 704), (384, 672), (384, 640), (416, 608), (448, 576), (480, 544), (512, 512)]


def test_512_reproduces_the_spec_list():
    expected = set(SPEC_512) | {(w, h) for h, w in SPEC_512}
    assert len(expected) == 13 and set(make_buckets(512, 32)) == expected


def test_1024_has_27_buckets_of_984_to_1024_tokens():
    buckets = make_buckets(1024, 32)
    tokens = [(h // 32) * (w // 32) for h, w in buckets]
    assert len(buckets) == 27 and min(tokens) == 984 and max(tokens) == 1024
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in buckets)
    assert (704, 1440) in buckets and (1440, 704) in buckets  # the nearest to 2:1 and 1:2
    assert buckets == sorted(buckets, key=lambda b: b[1] / b[0])


def test_nearest_bucket_hand_checked():
    b = make_buckets(512, 32)
    assert nearest_bucket(1000, 500, b) == (352, 704)  # exactly 2:1, landscape
    assert nearest_bucket(500, 1000, b) == (704, 352)
    assert nearest_bucket(640, 480, b) == (448, 576)  # 1.333: 1.286 is nearer than 1.462
    assert nearest_bucket(1920, 1080, b) == (384, 672)  # 1.778 → 1.75
    assert nearest_bucket(3000, 500, b) == (352, 704)  # beyond 2:1 → the end bucket
    assert nearest_bucket(77, 77, b) == (512, 512)


def test_resolve_buckets():
    assert resolve_buckets("square", 64, 16) == [(64, 64)]
    assert len(resolve_buckets("aspect", 512, 32)) == 13
    with pytest.raises(UserError):
        resolve_buckets("round", 512, 32)
    with pytest.raises(UserError):
        make_buckets(500, 32)


def test_to_pixels_resizes_without_crop_and_scales():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    x = to_pixels(img, (16, 32))
    assert x.shape == (3, 16, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, :, :12], torch.tensor(-1.0)) and torch.allclose(x[:, :, -12:], torch.tensor(1.0))
    grey = to_pixels(Image.fromarray(np.full((8, 8, 3), 51, np.uint8)), (8, 8))
    assert torch.allclose(grey, torch.tensor(51 / 127.5 - 1))


def test_token_table_lists_every_bucket():
    table = token_table(make_buckets(512, 32), 32)
    lines = table.splitlines()
    assert len(lines) == 14
    assert "352x704" in table and lines[-1].split()[-1] == "242"
