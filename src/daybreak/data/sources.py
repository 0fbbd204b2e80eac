"""Indexed, random-access readers for every `data.source`, all yielding the same sample contract.

A sample is `{"image": PIL RGB image, "captions": {column: text}, "key": str}`. Every source is
map-style (`len`, `probe(i)`, `[i]`) because exact resume and the rank split both need "sample i"
to mean the same thing on every rank and after a restart: image folders are a sorted file list,
WebDataset tars are indexed once by member offset, MDS shards (PRX's per-aspect layout included,
`data/mds.py`) by shard and sample, parquet and `save_to_disk` folders in place by row group or
record batch (`data/arrow.py`), other Hugging Face datasets through `datasets`. Remote
WebDataset/MDS shards are downloaded whole into a cache directory on first use.

`probe(i)` is the cheap half of a read (image header + captions); `meta()` is every example's
probe in one table (from `width`/`height` columns where the data has them), read once per dataset
(`data/meta.py`); `[i]` decodes the pixels and runs in data-loader workers. Both raise
`SkipSample(reason, where)` for bad data, `where` naming the file: `empty` (zero bytes),
`not_image` (not an image), `truncated` (JPEG without its end marker, PNG without IEND), `corrupt`
(any decode error, whatever the exception), `too_large` (more pixels than `data.max_pixels`, by
default PIL's decompression-bomb limit), `bad_caption` (a caption file that cannot be read or
parsed) and `unreadable` (a row or file that cannot be read). `locate(i)` names where example i
lives, for the log; damaged files a source leaves out at opening are listed in its `damaged` and
their samples counted in its `lost`.

Captions are named, never guessed: `open_source` sets each source's `caption_columns` from its
`string_columns()` (a schema's string columns, or the caption fields of its first examples) and the
columns the config names (`resolve_caption_columns`); `captions(i)` returns those only. `key(i)` and
`raw_image(i)` (the stored bytes, a path, or a decoded image) serve `daybreak data convert`.

Colour: CMYK, palette, grey and 16-bit images are converted to 8-bit RGB (16-bit by dividing by
257); transparency is composited on white, the usual backdrop of cut-out product shots and logos;
EXIF orientation is applied, so probe sizes match decoded sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from daybreak.data.captions import resolve_caption_columns
from daybreak.errors import UserError
from daybreak.schema import Registry

ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
Sample = dict[str, Any]
Probe = tuple[tuple[int, int], dict[str, str]]  # ((width, height), captions)
_FIRST = 64  # examples whose caption fields stand for a source without a schema (files, JSON captions)


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and its message's words."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it goes to."""

    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(f"{reason}: {key}")
        self.reason, self.key = reason, key


def _tail_ok(tail: bytes, fmt: str | None) -> bool:
    if fmt == "JPEG":
        return b"\xff\xd9" in tail
    if fmt == "PNG":
        return b"IEND" in tail
    return True


def pixel_limit(max_pixels: int | None) -> int:
    """`data.max_pixels`, or PIL's decompression-bomb limit when unset."""
    return int(max_pixels) if max_pixels else int(Image.MAX_IMAGE_PIXELS or 2**62)


def check_pixels(w: int, h: int, key: str, max_pixels: int | None = None) -> None:
    if w < 1 or h < 1:
        raise SkipSample("corrupt", key)
    if w * h > pixel_limit(max_pixels):
        raise SkipSample("too_large", key)


def _open(data: bytes | Path, key: str, max_pixels: int | None = None) -> Image.Image:
    """Open lazily (header only), check the size limit and the file's end marker; SkipSample when bad."""
    if max_pixels and (Image.MAX_IMAGE_PIXELS or 2**62) < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # an explicit data.max_pixels above PIL's limit replaces it
    try:
        size = data.stat().st_size if isinstance(data, Path) else len(data)
    except OSError as e:
        raise SkipSample("unreadable", key) from e
    if size == 0:
        raise SkipSample("empty", key)
    try:
        img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        if isinstance(data, Path):
            with open(data, "rb") as f:
                f.seek(max(0, size - 1024))
                tail = f.read()
        else:
            tail = data[-1024:]
    except Image.DecompressionBombError as e:
        raise SkipSample("too_large", key) from e
    except UnidentifiedImageError as e:
        raise SkipSample("not_image", key) from e
    except Exception as e:  # noqa: BLE001  (a header PIL cannot parse, whatever it raises)
        raise SkipSample("not_image", key) from e
    if not _tail_ok(tail, img.format):
        raise SkipSample("truncated", key)
    check_pixels(*img.size, key, max_pixels)
    return img


def probe_image(data: bytes | Path, key: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the header alone (a PNG's EXIF is read only when it
    precedes the pixel data: PIL would decode the whole image to look behind it)."""
    img = _open(data, key, max_pixels)
    w, h = img.size
    try:
        exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
        rotated = exif.get(0x0112, 1) in (5, 6, 7, 8)
    except Exception as e:  # noqa: BLE001
        raise SkipSample("corrupt", key) from e
    return (h, w) if rotated else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16-bit scaled down, CMYK/P/L converted."""
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max() > 255:  # 16-bit data (PNG decodes it as mode "I")
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes | Path | Image.Image, key: str, max_pixels: int | None = None) -> Image.Image:
    """Fully decoded RGB image, or SkipSample (any decoder exception is `corrupt`)."""
    try:
        if isinstance(data, Image.Image):
            check_pixels(*data.size, key, max_pixels)
            return to_rgb(data)
        img = _open(data, key, max_pixels)
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipSample("too_large", key) from e
    except Exception as e:  # noqa: BLE001  (damaged pixel data raises anything from OSError to SyntaxError)
        raise SkipSample("corrupt", key) from e


def _usable(captions: dict[str, Any]) -> dict[str, str]:
    return {k: v.strip() for k, v in captions.items() if isinstance(v, str) and v.strip()}


def _named(captions: dict[str, str], columns: Sequence[str] | None) -> dict[str, str]:
    """The caption columns a source trains on (`columns`, set by `open_source`; None: all of them)."""
    return captions if columns is None else {c: captions[c] for c in columns if c in captions}


def _first_fields(source: Any, fields: Callable[[int], dict[str, str]]) -> list[str]:
    """The caption fields seen in the first examples of a source whose examples may differ (a bad
    example among them is the loader's to skip and count)."""
    found: set[str] = set()
    for i in range(min(len(source), _FIRST)):
        try:
            found.update(fields(i))
        except SkipSample:
            continue
    return sorted(found)


def _parse_captions(ext: str, raw: bytes, key: str = "") -> dict[str, str]:
    """A `.json` sidecar is a dict of caption columns; a `.txt` one is the caption `caption`. Text that
    is not UTF-8, or JSON that does not parse or is not an object, is `bad_caption`."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text) if ext == ".json" else {"caption": text}
    except (UnicodeDecodeError, ValueError) as e:
        raise SkipSample("bad_caption", key) from e
    if not isinstance(obj, dict):
        raise SkipSample("bad_caption", key)
    return _usable(obj)


class ImageFolderSource:
    """Images in nested folders, each with a same-named `.json` or `.txt` caption file."""

    def __init__(self, root: str | Path, max_pixels: int | None = None) -> None:
        self.root, self.max_pixels = Path(root), max_pixels
        if not self.root.is_dir():
            raise UserError(f"data.path {str(root)!r} is not a directory")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
        )
        if not self.files:
            raise UserError(f"data.path {str(root)!r} holds no images ({', '.join(IMAGE_EXTS)})")
        stems = Counter(p.with_suffix("") for p in self.files)
        self._shared_stem = {p for p in self.files if stems[p.with_suffix("")] > 1}  # a.png + a.jpg
        self.caption_columns: list[str] | None = None
        self.home = self.root

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        """The path below the root without its suffix, or with it where two images share a stem."""
        rel = self.files[i].relative_to(self.root)
        return (rel if self.files[i] in self._shared_stem else rel.with_suffix("")).as_posix()

    def locate(self, i: int) -> str:
        return str(self.files[i])

    def fingerprint(self) -> str:
        """The file list (not each file's stat: millions of them); content edits in place keep it."""
        from daybreak.data.meta import fingerprint

        return fingerprint(["imagefolder", self.root.resolve(), self.max_pixels, self.caption_columns, len(self.files),
                            hashlib.sha256("\n".join(map(str, self.files)).encode()).hexdigest()])

    def _sidecar(self, i: int) -> dict[str, str]:
        for ext in (".json", ".txt"):
            side = self.files[i].with_suffix(ext)
            if side.is_file():
                try:
                    raw = side.read_bytes()
                except OSError as e:
                    raise SkipSample("bad_caption", str(side)) from e
                return _parse_captions(ext, raw, str(side))
        return {}

    def captions(self, i: int) -> dict[str, str]:
        return _named(self._sidecar(i), self.caption_columns)

    def string_columns(self) -> list[str]:
        return _first_fields(self, self._sidecar)

    def raw_image(self, i: int) -> Path:
        return self.files[i]

    def probe(self, i: int) -> Probe:
        return probe_image(self.files[i], self.locate(i), self.max_pixels), self.captions(i)

    def meta(self) -> Any:
        from daybreak.data.meta import probe_rows

        return probe_rows(len(self), self.probe, self.locate)

    def __getitem__(self, i: int) -> Sample:
        image = decode_image(self.files[i], self.locate(i), self.max_pixels)
        return {"image": image, "captions": self.captions(i), "key": self.key(i)}


def _fetch(url: str, cache_dir: str | Path | None) -> Path:
    """A local path for `url`: itself when local, else a whole-file copy in `cache_dir`."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        if not Path(url).is_file():
            raise UserError(f"data.path: no such file {url!r}")
        return Path(url)
    if cache_dir is None:
        raise UserError(f"data.cache_dir is required for remote shards ({url})")
    dest = Path(cache_dir) / url.split("://", 1)[1].replace("/", "_")
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url) as r:
                    while chunk := r.read(1 << 20):
                        tmp.write(chunk)
            except OSError as e:
                Path(tmp.name).unlink()
                raise UserError(f"cannot download {url}: {e}") from e
        Path(tmp.name).replace(dest)
    return dest


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns (`shard-{000..009}.tar`), a directory of `.tar` files, or a list of either."""
    from braceexpand import braceexpand

    if not isinstance(spec, str):
        return [u for s in spec for u in expand_shards(s)]
    if "://" not in spec and Path(spec).is_dir():
        return [str(p) for p in sorted(Path(spec).rglob("*.tar"))]
    return list(braceexpand(spec))


class WebDatasetSource:
    """WebDataset tar shards (`key.jpg` + `key.txt`/`key.json`), indexed by member offset.

    A shard cut in the middle keeps the samples stored whole before the cut; a shard that is no tar
    at all is left out. Both are named in `damaged` and their lost samples counted in `lost`."""

    def __init__(self, spec: str | Sequence[str], cache_dir: str | Path | None = None,
                 max_pixels: int | None = None) -> None:
        urls = expand_shards(spec)
        if not urls:
            raise UserError(f"data.path {spec!r} names no .tar shards")
        self.max_pixels = max_pixels
        self.shards = [_fetch(u, cache_dir) for u in urls]
        self.items: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        self.lost: Counter[str] = Counter()
        self.damaged: list[str] = []
        for s, path in enumerate(self.shards):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            end, stop = path.stat().st_size, 0
            try:
                with tarfile.open(path) as tar:
                    for m in tar:
                        if m.isfile():
                            folder, _, base = m.name.rpartition("/")
                            stem, _, ext = base.partition(".")
                            key = f"{folder}/{stem}" if folder else stem
                            members.setdefault(key, {})["." + ext.lower()] = (m.offset_data, m.size)
                    stop = tar.offset
            except (tarfile.TarError, OSError, EOFError) as e:
                if not members:
                    self.damaged.append(f"{path}: not a readable tar ({one_line(e)})")
                    self.lost["unreadable_shard"] += 1
                    continue
            whole = {k: v for k, v in members.items() if all(o + n <= end for o, n in v.values())}
            if len(whole) < len(members) or stop == 0 or end < stop + 1024:  # no end-of-archive blocks
                self.damaged.append(f"{path}: cut short after {len(whole)} whole samples")
                self.lost["truncated_shard"] += max(1, len(members) - len(whole))
            self.items += [
                (s, k, exts) for k, exts in whole.items() if any(e in IMAGE_EXTS for e in exts)
            ]
        self.caption_columns: list[str] | None = None
        if not self.items:
            raise UserError(f"no readable sample in {self.damaged[0] if self.damaged else spec}")
        self.lost = +self.lost
        self.home = self.shards[0].parent

    def __len__(self) -> int:
        return len(self.items)

    def key(self, i: int) -> str:
        return self.items[i][1]

    def locate(self, i: int) -> str:
        return f"{self.shards[self.items[i][0]]}:{self.items[i][1]}"

    def fingerprint(self) -> str:
        from daybreak.data.meta import fingerprint

        return fingerprint(["webdataset", self.max_pixels, self.caption_columns], [p.resolve() for p in self.shards])

    def _read(self, i: int, ext: str) -> bytes:
        s, _, exts = self.items[i]
        offset, size = exts[ext]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _image(self, i: int) -> bytes:
        return self._read(i, next(e for e in self.items[i][2] if e in IMAGE_EXTS))

    def _sidecar(self, i: int) -> dict[str, str]:
        exts = self.items[i][2]
        for ext in (".json", ".txt"):
            if ext in exts:
                try:
                    raw = self._read(i, ext)
                except OSError as e:
                    raise SkipSample("bad_caption", self.locate(i) + ext) from e
                return _parse_captions(ext, raw, self.locate(i) + ext)
        return {}

    def captions(self, i: int) -> dict[str, str]:
        return _named(self._sidecar(i), self.caption_columns)

    def string_columns(self) -> list[str]:
        return _first_fields(self, self._sidecar)

    def raw_image(self, i: int) -> bytes:
        return self._bytes(i)

    def _bytes(self, i: int) -> bytes:
        try:
            return self._image(i)
        except OSError as e:
            raise SkipSample("unreadable", self.locate(i)) from e

    def probe(self, i: int) -> Probe:
        return probe_image(self._bytes(i), self.locate(i), self.max_pixels), self.captions(i)

    def meta(self) -> Any:
        from daybreak.data.meta import probe_rows

        return probe_rows(len(self), self.probe, self.locate)

    def __getitem__(self, i: int) -> Sample:
        image = decode_image(self._bytes(i), self.locate(i), self.max_pixels)
        return {"image": image, "captions": self.captions(i), "key": self.items[i][1]}


def _image_payload(value: Any) -> bytes | Path | Image.Image:
    """An image cell as HF/MDS store it: raw bytes, a PIL image, a path, or {"bytes", "path"}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return Path(value)
    if isinstance(value, (bytes, bytearray, memoryview, Image.Image)):
        return bytes(value) if not isinstance(value, Image.Image) else value
    return b""


class _RowSource:
    """Shared logic for sources whose rows are dicts: an image column plus caption columns. Subclasses
    give `row(i, columns)` (only those columns, all when None), `locate(i)` and `light`: the
    columns cheap to read (text and numbers, not images or tensors). With integer `width` and
    `height` columns the size comes from them and the probe reads no image byte."""

    image_column: str
    caption_columns: Sequence[str] | None
    max_pixels: int | None = None
    light: list[str]
    row: Callable[..., dict[str, Any]]
    locate: Callable[[int], str]

    def _fields(self, row: dict[str, Any]) -> dict[str, str]:
        """Every caption candidate of a row: its string columns and a `captions` JSON mapping's entries."""
        caps = dict(row["captions"]) if isinstance(row.get("captions"), dict) else {}
        if isinstance(row.get("captions"), str):
            caps = _parse_captions(".json", row["captions"].encode())
        caps.update({k: v for k, v in row.items()
                     if isinstance(v, str) and k not in ("key", "captions", self.image_column)})
        return _usable(caps)

    def _captions(self, row: dict[str, Any]) -> dict[str, str]:
        return _named(self._fields(row), self.caption_columns)

    def _key(self, row: dict[str, Any], i: int) -> str:
        return str(row.get("key", row.get("__key__", f"{i:09d}")))

    def _columns(self, schema: dict[str, bool]) -> list[str]:
        """String columns from `schema` ({column: holds strings}) plus, where a `captions` column holds
        JSON mappings, the entries seen in the first rows."""
        named = [c for c, text in schema.items() if text and c not in ("key", "captions", self.image_column)]
        if "captions" in schema:
            named += _first_fields(self, lambda i: self._fields({"captions": self._row(i, ["captions"]).get("captions")}))
        return sorted(set(named))

    def _row(self, i: int, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """`row`, with any failure to read it (damaged shard, unreadable file) as `unreadable`."""
        try:
            return self.row(i, columns)
        except SkipSample:
            raise
        except Exception as e:  # noqa: BLE001
            raise SkipSample("unreadable", self.locate(i)) from e

    @property
    def sized(self) -> bool:
        return "width" in self.light and "height" in self.light

    def key(self, i: int) -> str:
        return self._key(self._row(i, self.light), i)

    def captions(self, i: int) -> dict[str, str]:
        row = self._row(i, self.light)
        try:
            return self._captions(row)
        except SkipSample as e:
            raise SkipSample(e.reason, self.locate(i)) from e

    def _size(self, row: dict[str, Any], i: int) -> tuple[int, int]:
        try:
            w, h = int(row["width"]), int(row["height"])
        except (TypeError, ValueError) as e:
            raise SkipSample("corrupt", self.locate(i)) from e
        check_pixels(w, h, self.locate(i), self.max_pixels)
        return w, h

    def raw_image(self, i: int) -> bytes | Path | Image.Image:
        return _image_payload(self._row(i, [self.image_column]).get(self.image_column))

    def probe(self, i: int) -> Probe:
        if self.sized:
            return self._size(self._row(i, self.light), i), self.captions(i)
        row = self._row(i)
        payload = _image_payload(row.get(self.image_column))
        if isinstance(payload, Image.Image):
            check_pixels(*payload.size, self.locate(i), self.max_pixels)
            return payload.size, self._captions(row)
        return probe_image(payload, self.locate(i), self.max_pixels), self._captions(row)

    def meta(self) -> Any:
        from daybreak.data.meta import probe_rows

        return probe_rows(len(self), self.probe, self.locate)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Sample:
        row = self._row(i)
        image = decode_image(_image_payload(row.get(self.image_column)), self.locate(i), self.max_pixels)
        try:
            captions = self._captions(row)
        except SkipSample as e:
            raise SkipSample(e.reason, self.locate(i)) from e
        return {"image": image, "captions": captions, "key": self._key(row, i)}


_HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class HFSource(_RowSource):
    """A Hugging Face dataset through `datasets` (a hub id, json or csv files): the copy `datasets`
    makes is its own. Parquet and `save_to_disk` folders are read in place by `ArrowSource`."""

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        caption_columns: Sequence[str] | None = None,
        split: str = "train",
        max_pixels: int | None = None,
    ) -> None:
        import datasets

        p = Path(path)
        try:
            if p.exists():
                candidates = [p] if p.is_file() else sorted(p.rglob("*"))
                files = [f for f in candidates if f.suffix in _HF_BUILDERS]
                if not files:
                    raise UserError(f"data.path {path!r} holds no dataset files ({', '.join(_HF_BUILDERS)})")
                builder = _HF_BUILDERS[files[0].suffix]
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split)
            else:
                ds = datasets.load_dataset(path, split=split)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            where = "" if p.exists() else f"no local folder {path!r} (download the data there, or fix the path), and "
            raise UserError(f"{where}cannot load the Hugging Face dataset {path!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        if image_column not in ds.column_names:
            raise UserError(
                f"data.image_column {image_column!r} is not a column of {path!r} ({ds.column_names})"
            )
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.caption_columns = ds, image_column, caption_columns
        self.path, self.max_pixels = path, max_pixels
        self._views: dict[tuple[str, ...] | None, Any] = {}
        self.light = [c for c, f in ds.features.items() if c != image_column and isinstance(f, datasets.Value)
                      and (f.dtype in ("string", "large_string") or f.dtype.startswith(("int", "uint")))]

    def __len__(self) -> int:
        return len(self.ds)

    def string_columns(self) -> list[str]:
        import datasets

        return self._columns({c: (isinstance(f, datasets.Value) and f.dtype in ("string", "large_string"))
                              or c == "captions" for c, f in self.ds.features.items()})

    def row(self, i: int, columns: Sequence[str] | None = None) -> dict[str, Any]:
        key = tuple(columns) if columns is not None else None
        if key not in self._views:
            self._views[key] = self.ds.select_columns(list(key)) if key is not None else self.ds
        return self._views[key][i]

    def locate(self, i: int) -> str:
        return f"{self.path} row {i}"


class MapSource:
    """Adapter for any map-style dataset already returning the sample contract (e.g. shapes)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def captions(self, i: int) -> dict[str, str]:
        own = getattr(self.dataset, "captions", None)  # e.g. shapes: captions without drawing the image
        return _usable(own(i) if callable(own) else self.dataset[i]["captions"])

    def probe(self, i: int) -> Probe:
        s = self.dataset[i]
        return s["image"].size, _usable(s["captions"])

    def key(self, i: int) -> str:
        return self.dataset[i]["key"]

    def raw_image(self, i: int) -> Image.Image:
        return self.dataset[i]["image"]

    def locate(self, i: int) -> str:
        return f"item {i}"

    def meta(self) -> Any:
        """Every item's size and caption columns: from the dataset when it knows them without drawing
        images (the synthetic shapes), else probed."""
        from daybreak.data.meta import Meta, probe_rows

        if hasattr(self.dataset, "meta"):
            return Meta.from_rows(self.dataset.meta())
        return probe_rows(len(self), self.probe, self.locate)

    def __getitem__(self, i: int) -> Sample:
        s = self.dataset[i]
        return {"image": to_rgb(s["image"]), "captions": _usable(s["captions"]), "key": s["key"]}


def caption_sample(source: Any, n: int, seed: int = 0) -> list[str]:
    """Every caption column of `n` items of `source` (all of them when it has at most `n`), drawn
    with `seed`: what the demo text tower's tokenizer is trained on."""
    count = len(source)
    picks = range(count) if count <= n else np.sort(np.random.default_rng(seed).choice(count, n, replace=False))
    out = []
    for i in picks:
        try:
            out += source.captions(int(i)).values()
        except SkipSample:  # a caption file that cannot be read is the loader's to count
            continue
    return out


def open_source(
    kind: str,
    path: str | Path | None = None,
    *,
    image_column: str = "image",
    caption_columns: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    size: int = 64,
    seed: int = 0,
    length: int = 100_000,
    max_pixels: int | None = None,
    all_captions: bool = False,
    caption_key: str = "data.captions",
) -> Any:
    """The source for `data.source`/`data.path`; `size`/`seed`/`length` only apply to shapes;
    `max_pixels` (default: PIL's decompression-bomb limit) skips larger images as `too_large`.

    Its caption columns are the `caption_columns` named, else its only string column (see
    `resolve_caption_columns`; `caption_key` is the config key an error tells the user to set), or,
    with `all_captions` (inspecting or converting data), every string column it has."""
    source = SOURCES[kind](path, image_column=image_column, caption_columns=caption_columns, cache_dir=cache_dir,
                           size=size, seed=seed, length=length, max_pixels=max_pixels)
    if kind != "shapes":  # the synthetic shapes keep their built-in captions
        columns = source.string_columns()
        source.caption_columns = columns if all_captions else resolve_caption_columns(
            columns, caption_columns, where=f"data.path {str(path)!r}", key=caption_key)
    return source


def _path(kind: str, path: str | Path | None, exists: bool = True) -> str:
    """A file source's `data.path`, required; a local one (not a pattern) must exist unless `exists` is off."""
    if path is None or str(path) == "":
        raise UserError(f"data.path is required for data.source={kind}")
    path = str(path)
    local = "://" not in path or path.startswith("file://")
    pattern = any(c in path for c in "{,")
    if exists and local and not pattern and not Path(path.removeprefix("file://")).exists():
        raise UserError(f"data.path {path!r} does not exist")
    return path


def _shapes(path: str | Path | None, *, size: int, seed: int, length: int, **_: Any) -> Any:
    from daybreak.data.shapes import ShapesDataset

    return MapSource(ShapesDataset(size=size, seed=seed, length=length))


def _imagefolder(path: str | Path | None, *, max_pixels: int | None, **_: Any) -> Any:
    return ImageFolderSource(_path("imagefolder", path), max_pixels)


def _webdataset(path: str | Path | None, *, cache_dir, max_pixels: int | None, **_: Any) -> Any:
    return WebDatasetSource(_path("webdataset", path), cache_dir, max_pixels)


def _mds(path: str | Path | None, *, image_column: str, caption_columns, cache_dir, max_pixels: int | None,
         **_: Any) -> Any:
    from daybreak.data.mds import MDSSource

    return MDSSource(_path("mds", path), cache_dir, image_column, caption_columns, max_pixels)


def _hf(path: str | Path | None, *, image_column: str, caption_columns, max_pixels: int | None, **_: Any) -> Any:
    """A dataset folder or parquet files read in place (`arrow.in_place`), else a hub id or a `datasets` script."""
    path = _path("hf", path, exists=False)
    local = "://" not in path or path.startswith("file://")
    looks_local = path.startswith(("/", ".", "~")) or Path(path).suffix
    if local and looks_local and not Path(path).exists():
        raise UserError(f"data.path {path!r} does not exist")
    from daybreak.data.arrow import ArrowSource, in_place

    if in_place(path):
        return ArrowSource(path, image_column, caption_columns, max_pixels=max_pixels)
    return HFSource(path, image_column, caption_columns, max_pixels=max_pixels)


# `data.source` (and each `data.mix` entry's `source`): opener(path, **options) -> source
SOURCES = Registry("data.source", {
    "shapes": _shapes, "imagefolder": _imagefolder, "hf": _hf, "webdataset": _webdataset, "mds": _mds,
})
