"""`daybreak data convert | inspect | bench`: write any source (or each entry of a config's `data.mix`)
out as shards, look at a dataset before training on it, and measure how fast the loader feeds a GPU.

Conversion copies each image's original bytes (no re-encoding, so pixels are identical; an image a
source only holds decoded is written as PNG) and every caption column it has (string columns or
sidecar entries; name them with `data.captions` when training). Examples that fail the probe (empty,
not an image, truncated) are left out and counted. Keys are the source's own, made unique (a
repeated key gets `#<index>`); WebDataset splits a member's name at its first dot, so its keys have
`%` and `.` written as `%25` and `%2E` (reversible, so `b.c` and `b_c` stay two samples). The output
is read back before the command reports: it must hold exactly the samples and keys written.
"""

from __future__ import annotations

import io
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
from daybreak.data.mix import MixSource, entry_name
from daybreak.data.sources import SkipSample, open_source
from daybreak.errors import UserError
from daybreak.schema import Registry

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


def open_inputs(src: str | Path, source: str = "imagefolder", cfg: Any = None) -> list[dict[str, Any]]:
    """What `convert` and `inspect` read: a data path of kind `source`, or, given a loaded config `cfg`
    (the CLI loads it when SRC names one), its data section, one entry per `data.mix` entry.
    Each entry: {name, source, path, weight, captions, reader}, the reader holding every caption column."""
    if cfg is None:
        return [{"name": entry_name(source, str(src)), "source": source, "path": str(src), "weight": 1.0,
                 "captions": {}, "reader": open_source(source, src, all_captions=True)}]
    d = cfg.data
    entries = d.mix or [d]
    return [{"name": getattr(e, "name", None) or entry_name(e.source, e.path), "source": e.source, "path": e.path,
             "weight": getattr(e, "weight", 1.0), "captions": dict(e.captions),
             "reader": open_source(e.source, e.path, image_column=e.image_column, cache_dir=d.cache_dir,
                                   size=d.image_size, seed=cfg.seed, length=d.length, max_pixels=d.max_pixels,
                                   all_captions=True)}
            for e in entries]


def _image_bytes(payload: bytes | Path | Image.Image) -> tuple[bytes, str]:
    """An image's stored bytes and their file extension (a decoded PIL image: PNG, lossless)."""
    if isinstance(payload, Image.Image):
        buf = io.BytesIO()
        payload.save(buf, format="PNG")
        return buf.getvalue(), "png"
    data = payload.read_bytes() if isinstance(payload, Path) else bytes(payload)
    return data, _EXT.get(Image.open(io.BytesIO(data)).format, "png")


def _valid(src: Any, skipped: Counter[str]) -> Iterator[tuple[str, bytes, str, dict[str, str]]]:
    """(unique key, image bytes, extension, captions) of every example that passes the probe."""
    seen: set[str] = set()
    for i in range(len(src)):
        try:
            _, captions = src.probe(i)
            data, ext = _image_bytes(src.raw_image(i))
        except SkipSample as e:
            skipped[e.reason] += 1
            continue
        except OSError:
            skipped["unreadable"] += 1
            continue
        key = src.key(i)
        key = f"{key}#{i}" if key in seen else key
        seen.add(key)
        yield key, data, ext, captions


def wds_key(key: str) -> str:
    """A key WebDataset keeps whole: no dot (its member names split at the first one), reversibly."""
    return key.replace("%", "%25").replace(".", "%2E")


def _webdataset(src: Any, out: Path, shard_size: int, force: bool, skipped: Counter[str]) -> list[str]:
    import webdataset as wds

    keys: list[str] = []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for key, data, ext, caps in _valid(src, skipped):
            keys.append(wds_key(key))
            sink.write({"__key__": keys[-1], ext: data, "json": caps})
    return keys


def _mds(src: Any, out: Path, shard_size: int, force: bool, skipped: Counter[str]) -> list[str]:
    from streaming import MDSWriter

    from daybreak.data.mds import register_bf16

    register_bf16()  # PRX's tensor encoding, for shards written beside PRX's

    keys: list[str] = []
    with MDSWriter(out=str(out), columns={"key": "str", "image": "bytes", "captions": "json"},
                   exist_ok=force) as sink:
        for key, data, _, caps in _valid(src, skipped):
            keys.append(key)
            sink.write({"key": key, "image": data, "captions": caps})
    return keys


def _hf(src: Any, out: Path, shard_size: int, force: bool, skipped: Counter[str]) -> list[str]:
    import datasets

    rows = list(_valid(src, skipped))
    keys = [r[0] for r in rows]
    columns = sorted({c for *_, caps in rows for c in caps} - {"key", "image"})
    table = {"key": keys, "image": [{"bytes": r[1], "path": None} for r in rows]}
    table |= {c: [r[3].get(c) for r in rows] for c in columns}
    features = datasets.Features(
        {"key": datasets.Value("string"), "image": datasets.Image()}
        | {c: datasets.Value("string") for c in columns}
    )
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(out))
    return keys


# `convert`'s output formats, each one a source kind that reads it back: writer(src, out, shard_size, force,
# skipped) -> the keys written, as the output spells them
FORMATS = Registry(None, {"webdataset": _webdataset, "mds": _mds, "hf": _hf}, what="convert format")


def convert(
    src: str | Path, out: str | Path, format: str = "webdataset", shard_size: int = 1000, force: bool = False,
    source: str = "imagefolder", cfg: Any = None,
) -> dict[str, Any]:
    """Write `src` (a data path of kind `source`, or, given `cfg`, that config's data: each `data.mix`
    entry into `out/<name>`)
    as WebDataset tars, MDS shards or a HF `save_to_disk` folder, then read the output back: it must
    hold exactly what was written. A non-empty `out` is refused unless `force` (then written into)."""
    from daybreak.io.store import check_output

    write = FORMATS[format]
    entries, out = open_inputs(src, source, cfg), Path(out)
    check_output(out, directory=True, force=force)
    reports = []
    for e in entries:
        dest = out / e["name"] if len(entries) > 1 else out
        dest.mkdir(parents=True, exist_ok=True)
        skipped: Counter[str] = Counter()
        keys = write(e["reader"], dest, shard_size, force, skipped)
        back = open_source(format, dest, all_captions=True)
        got = sorted(back.key(i) for i in range(len(back)))
        if got != sorted(keys):
            raise UserError(f"{dest}: wrote {len(keys)} samples but reads back {len(got)} "
                            f"({len(set(keys) - set(got))} written keys missing)")
        reports.append({"name": e["name"], "written": len(keys), "read_back": len(got), "skipped": dict(skipped),
                        "out": str(dest)})
    if len(entries) == 1:
        return reports[0] | {"format": format}
    return {"format": format, "out": str(out), "entries": reports}


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


def _inspect_one(src: Any, out: Path, limit: int, sheet: int) -> dict[str, Any]:
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
    out.mkdir(parents=True, exist_ok=True)
    _contact_sheet(shown, out / "contact_sheet.png")
    return {
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


def inspect(
    path: str | Path,
    source: str = "imagefolder",
    out: str | Path | None = None,
    limit: int = 2000,
    sheet: int = 16,
    cfg: Any = None,
) -> dict[str, Any]:
    """Count, caption lengths (words) of every caption column, short-side and 512 px bucket histograms
    over up to `limit` evenly spaced examples; writes `inspect.json` and `contact_sheet.png` into `out`.
    Given `cfg` (the config `path` names), each entry of its `data.mix` is inspected (into `out/<name>/`), with its
    weight, its share of the mix's samples and the caption columns the config names."""
    entries = open_inputs(path, source, cfg)
    out = Path(out) if out is not None else Path(str(path).rstrip("/").removesuffix(".yaml") + "-inspect")
    if cfg is None:
        report = {"path": str(path), "source": source} | _inspect_one(entries[0]["reader"], out, limit, sheet)
    else:
        mix = MixSource([(e["name"], e["reader"], e["weight"]) for e in entries])
        report = {"config": str(path), "samples_per_mix_epoch": len(mix), "entries": [
            {k: e[k] for k in ("name", "source", "path", "weight", "captions")}
            | {"share": round(count / len(mix), 4), "samples_per_mix_epoch": count}
            | _inspect_one(e["reader"], out / e["name"], limit, sheet)
            for e, count in zip(entries, mix.counts)]}
    out.mkdir(parents=True, exist_ok=True)
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
        open_source(source, path, all_captions=True),
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
