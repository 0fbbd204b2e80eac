"""`tiny` trains on PRX's own MDS layout (per-aspect folders, its columns, a bf16 embedding column);
the aspect folders feed the aspect buckets, the metadata table is kept in data.cache_dir; a damaged
PNG behind an intact header is a counted skip, not a crash, for the loader, convert and inspect."""

import io
import itertools
import json
import logging

import numpy as np
from helpers import make_prx_mds
from PIL import Image

from daybreak.config import load_config
from daybreak.data import BucketLoader, build_data, open_source
from daybreak.data.tools import convert, inspect
from daybreak.run import train


def test_tiny_trains_on_prx_mds_and_reuses_its_metadata(tmp_path):
    make_prx_mds(tmp_path / "mds")

    def cfg(name, steps):
        return load_config("tiny", [
            f"run.dir={tmp_path / name}", "data.source=mds", f"data.path={tmp_path / 'mds'}",
            "data.caption_columns=[prompt]", "data.image_size=32", "data.buckets=aspect", f"data.cache_dir={tmp_path / 'c'}",
            f"train.steps={steps}", "train.global_batch=4", "train.micro_batch=4", "train.log_every=1",
            "train.checkpoint_every=2", "sample.prompts=[]",
        ])

    final = train(cfg("run", 3), progress=False)
    assert (final / "transformer.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["skipped/total"] == 0
    assert len(list((tmp_path / "c" / "meta").glob("*.npz"))) == 1  # kept in data.cache_dir
    # the aspect folders feed the aspect buckets: every batch is one folder's aspect
    loader = build_data(cfg("run", 3), batch_size=4, patch=2)
    shapes = {}
    for batch in itertools.islice(loader, 6):
        h, w = batch["pixels"].shape[2:]
        shapes[(h, w)] = shapes.get((h, w), 0) + 1
    assert len(shapes) == 3 and all(np.sign(w - h) != 0 or w == h for h, w in shapes)
    assert {int(np.sign(w - h)) for h, w in shapes} == {-1, 0, 1}  # tall, square and wide folders


def _damaged_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    at = data.index(b"IDAT") + 24
    return data[:at] + bytes(b ^ 0x5A for b in data[at : at + 40]) + data[at + 40 :]


def test_damaged_pixels_are_skipped_by_the_loader_convert_and_inspect(tmp_path, caplog):
    folder = tmp_path / "f"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle")
    (folder / "bad.png").write_bytes(_damaged_png(1))
    (folder / "bad.txt").write_text("a blue square")
    loader = BucketLoader(open_source("imagefolder", folder), batch_size=4, buckets=[(16, 16)])
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(loader, 4))  # two passes over the 8 examples
    # its header is intact (the probe passes); decoding fails: replaced in its batch, counted once, named
    assert all(b["pixels"].shape == (4, 3, 16, 16) for b in batches)
    assert loader.stats()["replaced/corrupt"] == 1 and loader.stats()["skipped/total"] == 0
    assert caplog.text.count(f"(corrupt): {folder / 'bad.png'}") == 1
    # convert copies bytes behind a header probe (no decode: a pass over millions of images): no crash
    assert convert(folder, tmp_path / "wds", format="webdataset")["written"] == 8
    report = inspect(folder, "imagefolder", out=tmp_path / "inspect")
    assert report["skipped"] == {"corrupt": 1} and report["count"] == 8
