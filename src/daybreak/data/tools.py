"""`daybreak data convert | inspect | bench`: write an image folder out as shards, look at a
dataset before training on it, and measure how fast the loader feeds a GPU.

Conversion copies each image's original bytes (no re-encoding, so pixels are identical) and its
caption columns; examples that fail the probe (empty, not an image, truncated) are left out and
counted. Keys keep the folder structure (`sub/name`); WebDataset keys cannot hold dots, so dots
in file names become underscores there.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from daybreak.data.buckets import make_buckets, nearest_bucket, resolve_buckets
from daybreak.data.captions import CaptionMixer
from daybreak.data.loader import BucketLoader
from daybreak.data.sources import ImageFolderSource, SkipSample, open_source
from daybreak.errors import UserError

FORMATS = ("webdataset", "mds", "hf")


def _valid(
    src: ImageFolderSource, skipped: Counter[str]
) -> Iterator[tuple[str, bytes, str, dict[str, str]]]:
    for i in range(len(src)):
        try:
            _, captions = src.probe(i)
            data = src.files[i].read_bytes()
        except SkipSample as e:
            skipped[e.reason] += 1
            continue
        except OSError:
            skipped["unreadable"] += 1
            continue
        yield src.key(i), data, src.files[i].suffix.lower().lstrip("."), captions


def convert(
    src: str | Path, out: str | Path, format: str = "webdataset", shard_size: int = 1000, force: bool = False
) -> dict[str, Any]:
    """Write the image folder `src` to `out`: WebDataset tars, MDS shards or a HF `save_to_disk` folder.
    A non-empty `out` is refused unless `force` (then the shards are written into it)."""
    from daybreak.io.store import check_output

    if format not in FORMATS:
        raise UserError(f"convert format {format!r} is not one of {', '.join(FORMATS)}")
    folder, out, skipped = ImageFolderSource(src), Path(out), Counter[str]()
    check_output(out, directory=True, force=force)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    if format == "webdataset":
        import webdataset as wds

        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for key, data, ext, caps in _valid(folder, skipped):
                sink.write({"__key__": key.replace(".", "_"), ext: data, "json": caps})
                count += 1
    elif format == "mds":
        from streaming import MDSWriter

        from daybreak.data.mds import register_bf16

        register_bf16()  # PRX's tensor encoding, for shards written beside PRX's

        with MDSWriter(out=str(out), columns={"key": "str", "image": "bytes", "captions": "json"},
                       exist_ok=force) as sink:
            for key, data, _, caps in _valid(folder, skipped):
                sink.write({"key": key, "image": data, "captions": caps})
                count += 1
    else:
        import datasets

        rows = list(_valid(folder, skipped))
        columns = sorted({c for *_, caps in rows for c in caps} - {"key", "image"})
        table = {"key": [r[0] for r in rows], "image": [{"bytes": r[1], "path": None} for r in rows]}
        table |= {c: [r[3].get(c) for r in rows] for c in columns}
        features = datasets.Features(
            {"key": datasets.Value("string"), "image": datasets.Image()}
            | {c: datasets.Value("string") for c in columns}
        )
        datasets.Dataset.from_dict(table, features=features).save_to_disk(str(out))
        count = len(rows)
    return {"written": count, "skipped": dict(skipped), "out": str(out), "format": format}


def _word_stats(lengths: list[int]) -> dict[str, float]:
    return {
        "count": len(lengths),
        "min": min(lengths),
        "mean": round(statistics.fmean(lengths), 2),
        "median": statistics.median(lengths),
        "max": max(lengths),
    }


def _short_side_bin(w: int, h: int) -> str:
    edges = (256, 512, 1024, 2048)
    s = min(w, h)
    lo = max((e for e in edges if e <= s), default=0)
    hi = min((e for e in edges if e > s), default=None)
    return f"{lo}-{hi}" if hi else f">={lo}"


def _contact_sheet(images: list[Image.Image], path: Path, cell: int = 128, cols: int = 4) -> None:
    rows = max(1, -(-len(images) // cols))
    sheet = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for k, img in enumerate(images):
        thumb = img.copy()
        thumb.thumbnail((cell, cell))
        x = (k % cols) * cell + (cell - thumb.width) // 2
        y = (k // cols) * cell + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    sheet.save(path)


def inspect(
    path: str | Path,
    source: str = "imagefolder",
    out: str | Path | None = None,
    limit: int = 2000,
    sheet: int = 16,
) -> dict[str, Any]:
    """Count, caption lengths (words) per column, short-side and 512 px bucket histograms over up to
    `limit` evenly spaced examples; writes `inspect.json` and `contact_sheet.png` into `out`."""
    src = open_source(source, path)
    out = Path(out) if out is not None else Path(str(path).rstrip("/") + "-inspect")
    out.mkdir(parents=True, exist_ok=True)
    n = len(src)
    picks = sorted({round(k * (n - 1) / max(1, min(n, limit) - 1)) for k in range(min(n, limit))})
    skipped, resolutions, aspects = Counter[str](), Counter[str](), Counter[str]()
    words: dict[str, list[int]] = {}
    shown: list[Image.Image] = []
    buckets = make_buckets(512, 32)
    for i in picks:
        try:
            (w, h), caps = src.probe(i)
            if len(shown) < sheet:
                shown.append(src[i]["image"])
        except SkipSample as e:
            skipped[e.reason] += 1
            continue
        for column, text in caps.items():
            words.setdefault(column, []).append(len(text.split()))
        resolutions[_short_side_bin(w, h)] += 1
        bh, bw = nearest_bucket(w, h, buckets)
        aspects[f"{bh}x{bw}"] += 1
    report = {
        "path": str(path),
        "source": source,
        "count": n,
        "inspected": len(picks),
        "skipped": dict(skipped),
        "caption_words": {c: _word_stats(v) for c, v in sorted(words.items())},
        "short_side_histogram": dict(
            sorted(resolutions.items(), key=lambda kv: int(kv[0].strip(">=").split("-")[0]))
        ),
        "bucket_histogram_512": {f"{h}x{w}": aspects.get(f"{h}x{w}", 0) for h, w in buckets},
        "contact_sheet": str(out / "contact_sheet.png"),
    }
    _contact_sheet(shown, out / "contact_sheet.png")
    (out / "inspect.json").write_text(json.dumps(report, indent=2))
    return report


def bench(
    source: str,
    path: str | Path | None = None,
    *,
    seconds: float = 10.0,
    batch_size: int = 16,
    resolution: int = 512,
    patch: int = 32,
    buckets: str = "aspect",
    num_workers: int = 2,
    captions: dict[str, float] | None = None,
    world_size: int = 1,
    rank: int = 0,
) -> dict[str, Any]:
    """What the loader of rank `rank` of `world_size` delivers (global batch = batch_size × world_size):
    images/s, and the main process's CPU time per step (with `num_workers=0` that is all of one
    rank's loading work: the global sampler plus decoding its own slice), after one warm-up batch
    for `seconds`; and `first_batch_s`, the time to that first batch (which includes reading the
    examples' sizes: from the metadata table when one is kept for this data, else building and
    keeping it, as rank 0 of a run does)."""
    mixer = CaptionMixer(captions or ({"short": 0.5, "long": 0.5} if source == "shapes" else None))
    loader = BucketLoader(
        open_source(source, path),
        batch_size=batch_size,
        buckets=resolve_buckets(buckets, resolution, patch),
        caption_mixer=mixer,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
    )
    it = iter(loader)
    begin = time.perf_counter()
    next(it)
    first = time.perf_counter() - begin
    images, steps, start, cpu = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        images += len(next(it)["keys"])
        steps += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"source": source, "first_batch_s": round(first, 3), "examples": len(loader.source),
            "images_per_s": round(images / wall, 1), "main_ms_per_step": round(1e3 * cpu / max(steps, 1), 2),
            "steps": steps, "resolution": resolution, "batch": batch_size, "global_batch": batch_size * world_size,
            "world_size": world_size, "rank": rank, "workers": num_workers}
