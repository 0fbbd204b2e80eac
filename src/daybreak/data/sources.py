"""Indexed, random-access readers for every `data.source`, all yielding the same sample contract.

A sample is `{"image": PIL RGB image, "captions": {column: text}, "key": str}`. Every source is
map-style (`len`, `probe(i)`, `[i]`) because exact resume and the rank split both need "sample i"
to mean the same thing on every rank and after a restart: image folders are a sorted file list,
WebDataset tars are indexed once by member offset, MDS shards are read with their own reader by
sample index, and Hugging Face datasets are Arrow tables. Remote WebDataset/MDS shards are
downloaded whole into a cache directory on first use (atomically, so ranks may share it).

Captions are named, never guessed: `open_source` sets each source's `caption_columns` from its
`string_columns()` (a schema's string columns, or the caption fields of its first examples) and the
columns the config names (`resolve_caption_columns`); `captions(i)` returns those only. `key(i)` and
`raw_image(i)` (the stored bytes, a path, or a decoded image) serve `daybreak data convert`.

`probe(i)` is the cheap half of a read (image header + captions) that the loader's sampler runs on
every rank to choose buckets; `[i]` decodes the pixels and runs in data-loader workers. Both raise
`SkipSample(reason)` for bad data: `empty` (zero bytes), `not_image` (not decodable as an image),
`truncated` (JPEG without its end marker, PNG without IEND) and `corrupt` (a decode error).

Colour: CMYK, palette, grey and 16-bit images are converted to 8-bit RGB (16-bit by dividing by
257); transparency is composited on white, the usual backdrop of cut-out product shots and logos;
EXIF orientation is applied, so probe sizes match decoded sizes.
"""

from __future__ import annotations

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

ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCES = ("shapes", "imagefolder", "hf", "webdataset", "mds")
Sample = dict[str, Any]
Probe = tuple[tuple[int, int], dict[str, str]]  # ((width, height), captions)
_FIRST = 64  # examples whose caption fields stand for a source without a schema (files, JSON captions)


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


def _open(data: bytes | Path, key: str) -> Image.Image:
    """Open lazily (header only) and check the file's end marker; raise SkipSample when bad."""
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if size == 0:
        raise SkipSample("empty", key)
    try:
        img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SkipSample("not_image", key) from e
    if isinstance(data, Path):
        with open(data, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    else:
        tail = data[-1024:]
    if not _tail_ok(tail, img.format):
        raise SkipSample("truncated", key)
    return img


def probe_image(data: bytes | Path, key: str) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the header alone."""
    img = _open(data, key)
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


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


def decode_image(data: bytes | Path | Image.Image, key: str) -> Image.Image:
    """Fully decoded RGB image, or SkipSample."""
    if isinstance(data, Image.Image):
        return to_rgb(data)
    img = _open(data, key)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise SkipSample("corrupt", key) from e


def _usable(captions: dict[str, Any]) -> dict[str, str]:
    return {k: v.strip() for k, v in captions.items() if isinstance(v, str) and v.strip()}


def _named(captions: dict[str, str], columns: Sequence[str] | None) -> dict[str, str]:
    """The caption columns a source trains on (`columns`, set by `open_source`; None: all of them)."""
    return captions if columns is None else {c: captions[c] for c in columns if c in captions}


def _first_fields(source: Any, fields: Callable[[int], dict[str, str]]) -> list[str]:
    """The caption fields seen in the first examples of a source whose examples may differ."""
    return sorted({c for i in range(min(len(source), _FIRST)) for c in fields(i)})


def _parse_captions(ext: str, raw: bytes) -> dict[str, str]:
    """A `.json` sidecar is a dict of caption columns; a `.txt` one is the caption `caption`."""
    text = raw.decode("utf-8", errors="replace")
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return _usable(obj) if isinstance(obj, dict) else {}
    return _usable({"caption": text})


class ImageFolderSource:
    """Images in nested folders, each with a same-named `.json` or `.txt` caption file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
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

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        """The path below the root without its suffix, or with it where two images share a stem."""
        rel = self.files[i].relative_to(self.root)
        return (rel if self.files[i] in self._shared_stem else rel.with_suffix("")).as_posix()

    def _sidecar(self, i: int) -> dict[str, str]:
        for ext in (".json", ".txt"):
            side = self.files[i].with_suffix(ext)
            if side.is_file():
                return _parse_captions(ext, side.read_bytes())
        return {}

    def captions(self, i: int) -> dict[str, str]:
        return _named(self._sidecar(i), self.caption_columns)

    def string_columns(self) -> list[str]:
        return _first_fields(self, self._sidecar)

    def raw_image(self, i: int) -> Path:
        return self.files[i]

    def probe(self, i: int) -> Probe:
        return probe_image(self.files[i], self.key(i)), self.captions(i)

    def __getitem__(self, i: int) -> Sample:
        key = self.key(i)
        return {"image": decode_image(self.files[i], key), "captions": self.captions(i), "key": key}


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
    """WebDataset tar shards (`key.jpg` + `key.txt`/`key.json`), indexed by member offset."""

    def __init__(self, spec: str | Sequence[str], cache_dir: str | Path | None = None) -> None:
        urls = expand_shards(spec)
        if not urls:
            raise UserError(f"data.path {spec!r} names no .tar shards")
        self.shards = [_fetch(u, cache_dir) for u in urls]
        self.items: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for s, path in enumerate(self.shards):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(path) as tar:
                    for m in tar:
                        if m.isfile():
                            folder, _, base = m.name.rpartition("/")
                            stem, _, ext = base.partition(".")
                            key = f"{folder}/{stem}" if folder else stem
                            members.setdefault(key, {})["." + ext.lower()] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                raise UserError(f"{path} is not a readable tar shard: {e}") from e
            self.items += [
                (s, k, exts) for k, exts in members.items() if any(e in IMAGE_EXTS for e in exts)
            ]
        self.caption_columns: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, i: int, ext: str) -> bytes:
        s, _, exts = self.items[i]
        offset, size = exts[ext]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _image(self, i: int) -> bytes:
        return self._read(i, next(e for e in self.items[i][2] if e in IMAGE_EXTS))

    def key(self, i: int) -> str:
        return self.items[i][1]

    def _sidecar(self, i: int) -> dict[str, str]:
        exts = self.items[i][2]
        for ext in (".json", ".txt"):
            if ext in exts:
                return _parse_captions(ext, self._read(i, ext))
        return {}

    def captions(self, i: int) -> dict[str, str]:
        return _named(self._sidecar(i), self.caption_columns)

    def string_columns(self) -> list[str]:
        return _first_fields(self, self._sidecar)

    def raw_image(self, i: int) -> bytes:
        return self._image(i)

    def probe(self, i: int) -> Probe:
        return probe_image(self._image(i), self.items[i][1]), self.captions(i)

    def __getitem__(self, i: int) -> Sample:
        key = self.items[i][1]
        return {"image": decode_image(self._image(i), key), "captions": self.captions(i), "key": key}


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
    """Shared logic for sources whose rows are dicts: an image column plus caption columns."""

    image_column: str
    caption_columns: Sequence[str] | None
    row: Callable[[int], dict[str, Any]]

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
            named += _first_fields(self, lambda i: self._fields({"captions": self.row(i).get("captions")}))
        return sorted(set(named))

    def key(self, i: int) -> str:
        return self._key(self.row(i), i)

    def captions(self, i: int) -> dict[str, str]:
        return self._captions(self.row(i))

    def raw_image(self, i: int) -> bytes | Path | Image.Image:
        return _image_payload(self.row(i).get(self.image_column))

    def probe(self, i: int) -> Probe:
        row = self.row(i)
        payload = _image_payload(row.get(self.image_column))
        key = self._key(row, i)
        size = payload.size if isinstance(payload, Image.Image) else probe_image(payload, key)
        return size, self._captions(row)

    def __getitem__(self, i: int) -> Sample:
        row = self.row(i)
        key = self._key(row, i)
        image = decode_image(_image_payload(row.get(self.image_column)), key)
        return {"image": image, "captions": self._captions(row), "key": key}


_HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class HFSource(_RowSource):
    """A Hugging Face dataset: a `save_to_disk` folder, data files (parquet, arrow, json, csv), or a hub id."""

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        caption_columns: Sequence[str] | None = None,
        split: str = "train",
    ) -> None:
        import datasets

        p = Path(path)
        try:
            if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(p))
            elif p.exists():
                candidates = [p] if p.is_file() else sorted(p.rglob("*"))
                files = [f for f in candidates if f.suffix in _HF_BUILDERS]
                if not files:
                    raise UserError(f"data.path {path!r} holds no dataset files ({', '.join(_HF_BUILDERS)})")
                builder = _HF_BUILDERS[files[0].suffix]
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split)
            else:
                ds = datasets.load_dataset(path, split=split)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            raise UserError(f"cannot load the Hugging Face dataset {path!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        if image_column not in ds.column_names:
            raise UserError(
                f"data.image_column {image_column!r} is not a column of {path!r} ({ds.column_names})"
            )
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.caption_columns = ds, image_column, caption_columns
        self.row = ds.__getitem__

    def __len__(self) -> int:
        return len(self.ds)

    def string_columns(self) -> list[str]:
        import datasets

        return self._columns({c: (isinstance(f, datasets.Value) and f.dtype in ("string", "large_string"))
                              or c == "captions" for c, f in self.ds.features.items()})


class MDSSource(_RowSource):
    """MosaicML streaming (MDS) shards, read by sample index; remote shards are cached whole."""

    def __init__(
        self,
        path: str,
        cache_dir: str | Path | None = None,
        image_column: str = "image",
        caption_columns: Sequence[str] | None = None,
    ) -> None:
        import daybreak  # noqa: F401  (its import fixes torchvision before `streaming` imports it)
        from streaming.base.format import reader_from_json
        from streaming.base.storage.download import CloudDownloader

        remote = "://" in path and not path.startswith("file://")
        local = Path(cache_dir) if remote and cache_dir else Path(path.removeprefix("file://"))
        if remote and cache_dir is None:
            raise UserError(f"data.cache_dir is required for remote MDS data ({path})")

        def fetch(name: str) -> None:
            if remote and not (local / name).is_file():
                local.mkdir(parents=True, exist_ok=True)
                CloudDownloader.get(path).download(f"{path.rstrip('/')}/{name}", str(local / name))

        fetch("index.json")
        if not (local / "index.json").is_file():
            raise UserError(f"data.path {path!r} has no MDS index.json")
        index = json.loads((local / "index.json").read_text())
        self.readers = []
        for obj in index["shards"]:
            reader = reader_from_json(str(local), None, obj)
            raw, zipped = obj["raw_data"]["basename"], obj.get("zip_data")
            if not (local / raw).is_file() and zipped:
                from streaming.base.compression import decompress

                fetch(zipped["basename"])
                packed = (local / zipped["basename"]).read_bytes()
                (local / raw).write_bytes(decompress(obj["compression"], packed))
            fetch(raw)
            self.readers.append(reader)
        self.offsets = np.cumsum([0] + [r.samples for r in self.readers])
        self.image_column, self.caption_columns = image_column, caption_columns

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def string_columns(self) -> list[str]:
        reader = self.readers[0]
        return self._columns({c: e == "str" or c == "captions"
                              for c, e in zip(reader.column_names, reader.column_encodings)})

    def row(self, i: int) -> dict[str, Any]:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.readers[s].get_item(i - int(self.offsets[s]))


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

    def meta(self) -> list[tuple[tuple[int, int], tuple[str, ...]]] | None:
        """Every item's (size, caption columns) when the dataset knows them without drawing images."""
        return self.dataset.meta() if hasattr(self.dataset, "meta") else None

    def __getitem__(self, i: int) -> Sample:
        s = self.dataset[i]
        return {"image": to_rgb(s["image"]), "captions": _usable(s["captions"]), "key": s["key"]}


def caption_sample(source: Any, n: int, seed: int = 0) -> list[str]:
    """Every caption column of `n` items of `source` (all of them when it has at most `n`), drawn
    with `seed`: what the demo text tower's tokenizer is trained on."""
    count = len(source)
    picks = range(count) if count <= n else np.sort(np.random.default_rng(seed).choice(count, n, replace=False))
    return [text for i in picks for text in source.captions(int(i)).values()]


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
    all_captions: bool = False,
    caption_key: str = "data.captions",
) -> Any:
    """The source for `data.source`/`data.path`; `size`/`seed`/`length` only apply to shapes.

    Its caption columns are the `caption_columns` named, else its only string column (see
    `resolve_caption_columns`; `caption_key` is the config key an error tells the user to set), or,
    with `all_captions` (inspecting or converting data), every string column it has."""
    source = _open_source(kind, path, image_column=image_column, caption_columns=caption_columns,
                          cache_dir=cache_dir, size=size, seed=seed, length=length)
    if kind != "shapes":  # the synthetic shapes keep their built-in captions
        columns = source.string_columns()
        source.caption_columns = columns if all_captions else resolve_caption_columns(
            columns, caption_columns, where=f"data.path {str(path)!r}", key=caption_key)
    return source


def _open_source(
    kind: str,
    path: str | Path | None,
    *,
    image_column: str,
    caption_columns: Sequence[str] | None,
    cache_dir: str | Path | None,
    size: int,
    seed: int,
    length: int,
) -> Any:
    if kind == "shapes":
        from daybreak.data.shapes import ShapesDataset

        return MapSource(ShapesDataset(size=size, seed=seed, length=length))
    if kind not in SOURCES:
        raise UserError(f"data.source {kind!r} is not one of {', '.join(SOURCES)}")
    if path is None or str(path) == "":
        raise UserError(f"data.path is required for data.source={kind}")
    path = str(path)
    local = "://" not in path or path.startswith("file://")
    pattern = any(c in path for c in "{,")
    if local and kind != "hf" and not pattern and not Path(path.removeprefix("file://")).exists():
        raise UserError(f"data.path {path!r} does not exist")
    if kind == "imagefolder":
        return ImageFolderSource(path)
    if kind == "webdataset":
        return WebDatasetSource(path, cache_dir)
    if kind == "mds":
        return MDSSource(path, cache_dir, image_column, caption_columns)
    looks_local = path.startswith(("/", ".", "~")) or Path(path).suffix
    if local and looks_local and not Path(path).exists():
        raise UserError(f"data.path {path!r} does not exist")
    return HFSource(path, image_column, caption_columns)
