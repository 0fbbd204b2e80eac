"""Every source reads back what the writers wrote; bad files and odd image modes are handled."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daybreak.data import SkipSample, open_source
from daybreak.data.sources import caption_sample, decode_image, to_rgb
from daybreak.data.tools import convert, inspect
from daybreak.errors import UserError

SIZES = [(32, 16), (16, 32), (24, 24)]


def make_folder(root: Path, n: int = 6) -> Path:
    """n noise PNGs in two sub-folders; even ones with a .json (short/long), odd ones with a .txt."""
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % 3]
        path = root / f"part{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        if i % 2 == 0:
            path.with_suffix(".json").write_text(json.dumps({"short": f"short {i}", "long": f"a long caption {i}"}))
        else:
            path.with_suffix(".txt").write_text(f"caption {i}\n")
    return root


def read_all(src) -> dict[str, tuple[dict[str, str], np.ndarray]]:
    out = {}
    for i in range(len(src)):
        sample = src[i]
        assert sample["image"].mode == "RGB"
        assert src.probe(i)[0] == sample["image"].size
        out[sample["key"]] = (sample["captions"], np.asarray(sample["image"]))
    return out


COLUMNS = ["short", "long", "caption"]


def test_imagefolder_keys_captions_pixels(tmp_path):
    src = open_source("imagefolder", make_folder(tmp_path / "f"), caption_columns=COLUMNS)
    data = read_all(src)
    assert sorted(data) == [f"part{i % 2}/img{i:02d}" for i in sorted(range(6), key=lambda i: (i % 2, i))]
    assert data["part0/img02"][0] == {"short": "short 2", "long": "a long caption 2"}
    assert data["part1/img03"][0] == {"caption": "caption 3"}
    assert data["part0/img00"][1].shape == (16, 32, 3)  # PNG of width 32, height 16


def test_caption_sample_reads_every_column_of_a_seeded_sample(tmp_path):
    src = open_source("imagefolder", make_folder(tmp_path / "f"), caption_columns=COLUMNS)
    everything = caption_sample(src, 100)
    assert sorted(everything) == sorted([f"short {i}" for i in (0, 2, 4)] + [f"a long caption {i}" for i in (0, 2, 4)]
                                        + [f"caption {i}" for i in (1, 3, 5)])
    some = caption_sample(src, 2, seed=5)
    assert some == caption_sample(src, 2, seed=5) and 2 <= len(some) <= 4 and set(some) <= set(everything)
    shapes = open_source("shapes", size=32, seed=3, length=50)
    assert caption_sample(shapes, 50) == [c for i in range(50) for c in shapes[i]["captions"].values()]


@pytest.mark.parametrize("fmt", ["webdataset", "mds", "hf"])
def test_convert_round_trip(tmp_path, fmt):
    folder = make_folder(tmp_path / "f")
    report = convert(folder, tmp_path / fmt, format=fmt, shard_size=4)
    assert report["written"] == 6
    expected = read_all(open_source("imagefolder", folder, caption_columns=COLUMNS))
    got = read_all(open_source(fmt, tmp_path / fmt, caption_columns=COLUMNS))
    assert sorted(got) == sorted(expected)
    for key, (caps, pixels) in expected.items():
        assert got[key][0] == caps
        np.testing.assert_array_equal(got[key][1], pixels)


def test_webdataset_brace_pattern_selects_shards(tmp_path):
    convert(make_folder(tmp_path / "f"), tmp_path / "wds", format="webdataset", shard_size=4)
    assert len(open_source("webdataset", str(tmp_path / "wds" / "shard-{000000..000001}.tar"), all_captions=True)) == 6
    assert len(open_source("webdataset", str(tmp_path / "wds" / "shard-000001.tar"), all_captions=True)) == 2


def test_bad_files_get_reasons_and_convert_skips_them(tmp_path):
    folder = make_folder(tmp_path / "f", n=3)
    buf = (folder / "part0" / "img00.png").read_bytes()
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "good.jpg")
    jpeg = (folder / "good.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(jpeg[: len(jpeg) * 3 // 4])
    (folder / "fake.png").write_bytes(b"this is not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(buf[: len(buf) // 2])
    src = open_source("imagefolder", folder, all_captions=True)
    reasons = {}
    for i in range(len(src)):
        try:
            src.probe(i)
        except SkipSample as e:
            reasons[e.key] = e.reason  # the file's path: what the log names
    assert reasons == {str(folder / "trunc.jpg"): "truncated", str(folder / "fake.png"): "not_image",
                       str(folder / "empty.png"): "empty", str(folder / "cut.png"): "truncated"}
    report = convert(folder, tmp_path / "wds", format="webdataset")
    assert report["written"] == 4 and sum(report["skipped"].values()) == 4


def test_modes_become_rgb():
    white_rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(white_rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    half = Image.new("LA", (4, 4), (0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(pal).getpixel((0, 0)) == (10, 20, 30)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_png_decodes_scaled(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)).save(path)
    assert decode_image(path, "deep").getpixel((1, 1)) == (100, 100, 100)


def test_shapes_source_follows_contract():
    src = open_source("shapes", size=32, seed=1, length=5)
    sample = src[3]
    assert len(src) == 5 and sample["image"].size == (32, 32)
    assert set(sample["captions"]) == {"short", "long"} and sample["key"]
    assert src.probe(3) == ((32, 32), sample["captions"])


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.source"):
        open_source("lmdb", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        open_source("imagefolder", tmp_path / "missing")
    with pytest.raises(UserError, match="does not exist"):
        open_source("hf", tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        open_source("imagefolder", tmp_path)


def test_inspect_reports_and_writes_sheet(tmp_path):
    folder = make_folder(tmp_path / "f")
    (folder / "fake.png").write_bytes(b"nope")
    report = inspect(folder, "imagefolder", out=tmp_path / "out")
    assert report["count"] == 7 and report["skipped"] == {"not_image": 1}
    assert report["caption_words"]["long"] == {"count": 3, "min": 4, "mean": 4.0, "median": 4, "max": 4}
    assert report["caption_words"]["caption"]["count"] == 3
    assert report["bucket_histogram_512"]["352x704"] == 2 and report["bucket_histogram_512"]["512x512"] == 2
    assert json.loads((tmp_path / "out" / "inspect.json").read_text()) == report
    assert Image.open(tmp_path / "out" / "contact_sheet.png").size == (512, 256)


@pytest.mark.parametrize("fmt", ["webdataset", "mds", "hf"])
def test_convert_keys_never_collide_and_read_back(tmp_path, fmt):
    # names that one key each would merge: same stem with two extensions, a dot against an underscore
    folder = tmp_path / "f"
    folder.mkdir()
    names = ["a.png", "a.jpg", "b.c.png", "b_c.png", "v1.0.png", "v1_0.png"]
    rng = np.random.default_rng(2)
    for k, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (8, 8 + k, 3), dtype=np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}")
    source = open_source("imagefolder", folder)
    assert len({source.key(i) for i in range(len(source))}) == 6
    report = convert(folder, tmp_path / fmt, format=fmt)
    assert report["written"] == report["read_back"] == 6
    back = open_source(fmt, tmp_path / fmt)
    widths = sorted(back[i]["image"].size[0] for i in range(len(back)))
    assert len(back) == 6 and widths == list(range(8, 14))  # six different images, none merged or lost
