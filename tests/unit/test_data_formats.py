"""PRX's per-aspect MDS layout, parquet and `save_to_disk` read in place, the sample-metadata table
(built once, kept, read by the other ranks and by restarts) and bad data in every format: each
damaged input is a counted skip or one line naming the file."""

import io
import json
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ASPECTS, LATENT, make_prx_mds

from daybreak.data import BucketLoader, CaptionMixer, SkipSample, open_source
from daybreak.data import meta as meta_mod
from daybreak.data.mds import _Shard, register_bf16
from daybreak.errors import UserError

CAPS = ["prompt", "enhanced_prompt"]


@pytest.fixture(scope="module")
def prx(tmp_path_factory):
    root = tmp_path_factory.mktemp("prx")
    return root / "mds", make_prx_mds(root / "mds")


def test_prx_layout_reads_as_one_source_with_its_columns(prx):
    root, written = prx
    src = open_source("mds", root, caption_columns=CAPS)
    assert len(src) == len(written) == 12 and not src.lost
    seen = set()
    for i in range(len(src)):
        row = src.row(i)
        assert LATENT not in row  # a tensor column daybreak does not use is never decoded
        want = written[row["id"]]
        seen.add(row["id"])
        sample = src[i]
        assert sample["image"].size == (want["width"], want["height"])
        assert sample["captions"] == {"prompt": want["prompt"], "enhanced_prompt": want["enhanced_prompt"]}
        assert Path(src.locate(i)).parent.parent.name in ASPECTS  # ROOT/<aspect>/w<k>/shard...
    assert seen == set(written)
    # the bf16 encoding is registered: streaming's own reader opens the shards and gets the tensor back
    from streaming.base.format import reader_from_json

    index = json.loads((root / "1.000" / "index.json").read_text())
    item = reader_from_json(str(root / "1.000"), None, index["shards"][0]).get_item(1)
    assert item[LATENT].dtype == torch.bfloat16 and torch.equal(item[LATENT], written[item["id"]][LATENT])


def test_meta_comes_from_width_height_without_reading_an_image(prx, monkeypatch):
    root, written = prx
    src = open_source("mds", root, caption_columns=CAPS)
    expected = [src.probe(i) for i in range(len(src))]
    reads, opens = [], []
    real_read = _Shard.read
    monkeypatch.setattr(_Shard, "read", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(a) or pytest.fail("an image was opened"))
    meta = src.meta()
    assert opens == [] and len(reads) <= 1  # counted: no image opened; at most one row's text read
    assert all(cols is not None and "image" not in cols for _, _, cols, _ in reads)
    for i, (size, caps) in enumerate(expected):
        assert meta[i] == (size, dict.fromkeys(caps, "x"))
    assert sorted(map(tuple, meta.sizes.tolist())) == sorted([ASPECTS[a] for a in ASPECTS for _ in range(4)])


def test_meta_table_rank0_writes_others_wait_restart_reuses(prx, tmp_path, monkeypatch):
    root, _ = prx
    cache = tmp_path / "cache"
    built = []

    def source():
        src = open_source("mds", root, caption_columns=CAPS)
        real = src.meta
        src.meta = lambda: built.append(1) or real()
        return src

    got = {}
    follower = threading.Thread(target=lambda: got.update(f=meta_mod.load_or_build(source(), cache, leader=False,
                                                                                     poll=0.01)))
    follower.start()  # waits: nothing is written yet
    follower.join(0.2)
    assert follower.is_alive() and not list(cache.rglob("*.npz"))
    lead = meta_mod.load_or_build(source(), cache, leader=True)
    follower.join(10)
    assert built == [1] and len(list(cache.rglob("*.npz"))) == 1  # built once, by the leader
    assert np.array_equal(got["f"].sizes, lead.sizes) and np.array_equal(got["f"].present, lead.present)
    again = meta_mod.load_or_build(source(), cache, leader=True)  # a restart
    assert built == [1] and np.array_equal(again.sizes, lead.sizes)
    # a loader on rank 5 of 32 reads the kept table (the batch is its own 1 of 32 examples)
    monkeypatch.setattr(meta_mod, "_is_leader", lambda: False)
    ld = BucketLoader(source(), batch_size=1, world_size=4, rank=3, buckets=list(ASPECTS.values()),
                      caption_mixer=CaptionMixer({"prompt": 1}), meta_cache=str(cache))
    next(iter(ld))
    assert built == [1]
    alone = meta_mod.load_or_build(source(), tmp_path / "unshared", leader=False, poll=0.01, patience=0.05)
    assert built == [1, 1] and np.array_equal(alone.sizes, lead.sizes)  # no table from rank 0: its own


def test_meta_table_follows_the_data(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i, (w, h) in enumerate([(8, 4), (4, 8)]):
        Image.new("RGB", (w, h)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"cap {i}")
    first = meta_mod.load_or_build(open_source("imagefolder", folder))
    assert len(list((folder / ".daybreak-meta").glob("*.npz"))) == 1  # kept beside the data
    Image.new("RGB", (6, 6)).save(folder / "2.png")
    second = meta_mod.load_or_build(open_source("imagefolder", folder))
    assert first.sizes.tolist() == [[8, 4], [4, 8]] and second.sizes.tolist() == [[8, 4], [4, 8], [6, 6]]
    (folder / ".daybreak-meta" / next((folder / ".daybreak-meta").glob("*.npz")).name).write_bytes(b"garbage")
    assert meta_mod.load_or_build(open_source("imagefolder", folder)).sizes.tolist() == second.sizes.tolist()


def _png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_parquet(root: Path, rows: int = 10, group: int = 3) -> "object":
    """A nested parquet folder in HF's image schema ({bytes, path} structs) with width/height columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = [(8 + i % 3 * 4, 12 - i % 3 * 2) for i in range(rows)]
    table = pa.table({
        "image": [{"bytes": _png(w, h, i), "path": f"{i}.png"} for i, (w, h) in enumerate(sizes)],
        "width": [w for w, _ in sizes], "height": [h for _, h in sizes],
        "caption_detail": [f"detail {i}" for i in range(rows)], "caption_original": [f"orig {i}" for i in range(rows)],
    })
    half = rows // 2
    for k, part in enumerate([table.slice(0, half), table.slice(half)]):
        (root / "data" / f"part{k}").mkdir(parents=True, exist_ok=True)
        pq.write_table(part, root / "data" / f"part{k}" / f"train-{k:05d}.parquet", row_group_size=group)
    return table


def test_parquet_read_in_place_random_access_equals_the_table(tmp_path, monkeypatch):
    import datasets

    table = make_parquet(tmp_path / "pq")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a copy through datasets"))
    src = open_source("hf", tmp_path / "pq", caption_columns=["caption_detail"])
    assert len(src) == table.num_rows
    rows = table.to_pylist()
    for i in np.random.default_rng(0).permutation(len(src)):  # a shuffled order
        assert src.row(int(i)) == rows[i]
        assert src[int(i)]["image"].size == (rows[i]["width"], rows[i]["height"])
    meta = src.meta()
    assert meta.sizes.tolist() == [[r["width"], r["height"]] for r in rows]
    # a save_to_disk folder is read in place too
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    disk = open_source("hf", tmp_path / "disk", caption_columns=["caption_detail"])
    assert [disk.row(i)["caption_detail"] for i in range(len(disk))] == [r["caption_detail"] for r in rows]
    assert disk[3]["image"].size == (rows[3]["width"], rows[3]["height"])


# -- bad data: input → counted reason, or one line naming the file --------------------------------

def _damage_png_pixels(data: bytes) -> bytes:
    """Flip bytes inside the first IDAT chunk's zlib stream, leaving the header and IEND intact."""
    at = data.index(b"IDAT") + 4 + 20
    return data[:at] + bytes(b ^ 0x5A for b in data[at : at + 40]) + data[at + 40 :]


def _folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        (folder / f"ok{i}.png").write_bytes(_png(8, 8, i))
        (folder / f"ok{i}.txt").write_text(f"caption {i}")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _skips(src) -> dict[str, int]:
    """What the loader counts over one pass, through the metadata table and decoding."""
    meta = meta_mod.build(src)
    counts = meta.counts()
    for i in range(len(src)):
        if not meta.reason[i]:
            try:
                src[i]
            except SkipSample as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
    return counts | {f"lost/{k}": v for k, v in getattr(src, "lost", {}).items()}


def test_image_folder_bad_samples_are_counted_by_reason(tmp_path):
    good = _png(8, 8, 9)
    folder = _folder(tmp_path, {
        "pixels.png": _damage_png_pixels(_png(24, 24, 5)), "pixels.txt": b"damaged pixels",
        "latin.png": good, "latin.txt": "caf\xe9".encode("latin-1"),
        "badjson.png": good, "badjson.json": b"{not json",
        "list.png": good, "list.json": b"[1, 2]",
        "huge.png": _png(40, 40, 3), "huge.txt": b"too many pixels",
    })
    src = open_source("imagefolder", folder, max_pixels=1000)
    assert _skips(src) == {"corrupt": 1, "bad_caption": 3, "too_large": 1}
    with pytest.raises(SkipSample) as e:
        src.captions([p.name for p in src.files].index("latin.png"))
    assert e.value.key == str(folder / "latin.txt")  # the log names the file


def _mds_variant(tmp_path: Path, damage) -> Path:
    root = tmp_path / "mds"
    make_prx_mds(root, per_worker=1)
    damage(root)
    return root


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_count(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda r: (r / "1.000" / "index.json").write_text("{not json"), {}),  # the workers' indexes are read
    (lambda r: [(r / "1.000" / f).write_text("{not json") for f in ("index.json", "w0/index.json")],
     {"lost/bad_index": 1}),
    (lambda r: (r / "2.000" / "w1" / "shard.00000.mds").unlink(), {"lost/missing_shard": 1}),
    (lambda r: _flip_count(r / "0.500" / "w0" / "shard.00000.mds"), {"lost/damaged_shard": 1}),
    (lambda r: _cut(r / "0.500" / "w1" / "shard.00000.mds", 0.7), {"lost/truncated_shard": 1}),
], ids=["merged-index-not-json", "both-indexes-not-json", "missing-shard", "damaged-header", "cut-shard"])
def test_damaged_mds_is_counted_per_source(tmp_path, damage, expected):
    src = open_source("mds", _mds_variant(tmp_path, damage), caption_columns=CAPS)
    assert _skips(src) == expected and len(src) == 6 - sum(expected.values()) and src.damaged


def test_damaged_sample_bytes_in_a_shard_are_corrupt(tmp_path):
    def scramble(root):
        shard = root / "1.000" / "w0" / "shard.00000.mds"
        data = bytearray(shard.read_bytes())
        start = int(np.frombuffer(bytes(data[4:8]), "<u4")[0])
        data[start : start + 8] = b"\xff" * 8  # the first sample's column sizes
        shard.write_bytes(bytes(data))

    src = open_source("mds", _mds_variant(tmp_path, scramble), caption_columns=CAPS)
    assert _skips(src) == {"corrupt": 1}


def _tar(path: Path, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in ((".png", _png(8, 8, i)), (".txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_files_of_every_format(tmp_path):
    import pyarrow as pa

    # a tar cut in the middle keeps the samples before the cut
    _tar(tmp_path / "a.tar", 4)
    _cut(tmp_path / "a.tar", 0.6)
    wds = open_source("webdataset", str(tmp_path / "a.tar"))
    assert len(wds) + sum(wds.lost.values()) <= 4 and len(wds) >= 1 and wds.damaged
    assert all(wds[i]["captions"] for i in range(len(wds)))
    # a truncated parquet beside a good one: the file is left out and counted
    make_parquet(tmp_path / "pq")
    _cut(tmp_path / "pq" / "data" / "part1" / "train-00001.parquet", 0.5)
    pq_src = open_source("hf", tmp_path / "pq", caption_columns=["caption_detail"])
    assert len(pq_src) == 5 and pq_src.lost == {"unreadable_file": 1}
    # a truncated save_to_disk Arrow file keeps its record batches before the cut
    table = pa.table({"image": [{"bytes": _png(8, 8, i), "path": None} for i in range(9)],
                      "caption": [f"c{i}" for i in range(9)]})
    import datasets

    datasets.Dataset(table).save_to_disk(str(tmp_path / "disk"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    with pa.OSFile(str(arrow), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=3):
            w.write_batch(batch)
    _cut(arrow, 0.8)
    disk = open_source("hf", tmp_path / "disk")
    assert 3 <= len(disk) < 9 and disk.lost == {"truncated_file": 1}
    assert [disk.row(i)["caption"] for i in range(len(disk))] == [f"c{i}" for i in range(len(disk))]


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "index.json").write_text("[not json"), "index.json"),
    (lambda p: _cut(make_parquet(p) and p / "data" / "part0" / "train-00000.parquet", 0.3), "train-00000.parquet"),
    (lambda p: (p / "x.tar").write_bytes(b"\0garbage" * 10), "x.tar"),
], ids=["mds-index", "parquet", "tar"])
def test_nothing_readable_is_one_line_naming_the_file(tmp_path, make, message):
    folder = tmp_path / "d"
    folder.mkdir()
    make(folder)
    for path in folder.rglob("*.parquet"):
        if path.name != "train-00000.parquet":
            path.unlink()
    kind = {"index.json": "mds", "x.tar": "webdataset"}.get(message, "hf")
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as e:
        open_source(kind, folder / "x.tar" if kind == "webdataset" else folder)
    assert "\n" not in str(e.value)


def test_bf16_encoding_round_trip():
    from streaming.base.format.mds.encodings import mds_decode, mds_encode

    register_bf16()
    x = torch.randn(2, 3, 5).bfloat16()
    data = mds_encode("bf16", x)
    assert len(data) == 4 + 3 * 4 + x.numel() * 2 and np.frombuffer(data[:4], np.uint32)[0] == 3
    assert torch.equal(mds_decode("bf16", data), x)
    assert zlib.crc32(data[16:]) == zlib.crc32(x.view(torch.int16).numpy().tobytes())  # the tensor's own bits


def test_prx_captions_are_named_never_guessed_and_a_mix_keeps_each_entrys_table(prx, tmp_path):
    root, written = prx
    with pytest.raises(UserError) as e:  # id, style, subset, score strings: never captions unless named
        open_source("mds", root)
    assert all(c in str(e.value) for c in ("id", "style", "subset", "aesthetic_predictor_v_2_5_score", "data.captions"))
    src = open_source("mds", root, caption_columns=["prompt"])
    assert src.meta().columns == ["prompt"] and src.captions(0) == {"prompt": written[src.row(0)["id"]]["prompt"]}
    # a mix: each entry's table is built through data/meta.py (one file per entry in the cache) and
    # repeated over the entry's indices; a bad example keeps its reason and is named with its entry
    from daybreak.data.mix import MixSource

    folder = tmp_path / "f"
    folder.mkdir()
    for name, data in {"a.png": _png(8, 4, 1), "a.txt": b"one", "b.png": b"", "b.txt": b"two"}.items():
        (folder / name).write_bytes(data)
    mix = MixSource([("prx", src, 1.0), ("f", open_source("imagefolder", folder), 1.0)], tmp_path / "cache")
    assert mix.counts == [12, 12] and len(mix) == 24
    meta = meta_mod.load_or_build(mix, tmp_path / "cache")
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2
    own = src.meta()
    for i in range(12):
        assert meta[i] == own[i]
    for i in range(12, 24):  # a.png, b.png, a.png, ... (index j reads example j mod 2)
        if i % 2 == 0:
            assert meta[i] == ((8, 4), {"caption": "x"})
        else:
            with pytest.raises(SkipSample) as bad:
                meta[i]
            assert bad.value.reason == "empty" and bad.value.key == f"f: {folder / 'b.png'}" == mix.locate(i)
