"""MosaicML streaming (MDS) shards as one indexed source, PRX's aspect-bucketed layout included.

PRX's `scripts/fine-t2i-to-mds.py` writes `ROOT/<aspect>/w<k>/shard.NNNNN.mds`, one `index.json`
per worker folder and a merged one per aspect folder (its shard names prefixed `w<k>/`), none at
ROOT. A root is read as every topmost folder below it that holds an `index.json` (its sub-folders'
indexes are then covered by it), in sorted order: a plain MDS folder, PRX's layout, or any depth in
between. The aspect folders feed the aspect buckets through their `width`/`height` columns.

Shards are read here, not through `streaming`'s readers: a sample's columns are located from its
header and only the ones used are decoded (the image's raw bytes, text and numbers), so columns
daybreak does not use (PRX's precomputed `bf16` text embeddings, scores) cost nothing, and
`streaming` itself (tens of seconds of imports) is not imported to read; the sizes and caption
columns of a whole shard come from its headers and small columns alone (`meta()`), never from
image bytes. PRX's `bf16` tensor encoding is registered with `streaming` (`register_bf16`, done
whenever `streaming` is loaded beside this reader and by `daybreak data convert`), so its own
writers and readers handle such shards.

Damage is counted, not fatal: an index that is not JSON, a missing shard file, a shard whose
header disagrees with its index, a shard cut short (the samples before the cut are kept) are
named in `damaged` and their samples counted in `lost`; with nothing readable, one line names the
first file.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daybreak.data.sources import SkipSample, _RowSource, check_pixels, one_line
from daybreak.errors import UserError

_TEXT = {"str", "str_int", "str_float", "str_decimal", "json"}
_NUMBER = {"int": "<i8", "int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
           "uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}
_RAW_IMAGE = {"bytes", "jpeg", "png"}  # stored as the file's own bytes


def _decode(enc: str, raw: bytes, image: bool) -> Any:
    """One cell as `streaming` would decode it, without importing `streaming` (tens of seconds of
    imports at every start) for the encodings daybreak reads: text, integers, JSON, image bytes."""
    if image and enc in _RAW_IMAGE:
        return raw
    if enc == "str":
        return raw.decode("utf-8")
    if enc == "json":
        return json.loads(raw.decode("utf-8"))
    if enc in _NUMBER:
        return int(np.frombuffer(raw, _NUMBER[enc])[0])
    from streaming.base.format.mds.encodings import mds_decode  # str_int, pil images, ...

    return mds_decode(enc, raw)


def register_bf16() -> None:
    """Add PRX's `bf16` column encoding (uint32 ndim, int32 shape, the tensor's bf16 bits) to
    `streaming`'s registry, once."""
    import daybreak  # noqa: F401  (its import fixes torchvision before `streaming` imports it)
    from streaming.base.format.mds import encodings

    if "bf16" in encodings._encodings:
        return

    class BF16(encodings.Encoding):
        """A bfloat16 torch tensor, stored as PRX stores it."""

        def encode(self, obj: Any) -> bytes:
            import torch

            if not isinstance(obj, torch.Tensor) or obj.dtype != torch.bfloat16:
                raise TypeError(f"bf16 columns hold bfloat16 tensors, got {type(obj).__name__}")
            shape = np.asarray(obj.shape, np.int32)
            bits = obj.contiguous().view(torch.int16).numpy().view(np.uint16)
            return np.uint32(shape.size).tobytes() + shape.tobytes() + bits.tobytes()

        def decode(self, data: bytes) -> Any:
            import torch

            ndim = int(np.frombuffer(data[:4], np.uint32)[0])
            shape = tuple(int(d) for d in np.frombuffer(data[4 : 4 + 4 * ndim], np.int32))
            bits = np.frombuffer(data[4 + 4 * ndim :], np.uint16).astype(np.int16)
            return torch.from_numpy(bits.copy()).view(torch.bfloat16).reshape(shape)

    encodings._encodings["bf16"] = BF16


def mds_roots(root: Path) -> list[Path]:
    """Every topmost folder at or below `root` that holds an `index.json`, sorted."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        if "index.json" in files:
            found.append(Path(folder))
            dirs[:] = []
        else:
            dirs.sort()
    return sorted(found)


class _Shard:
    """One `.mds` file: column layout from its index entry, samples located from its header."""

    def __init__(self, path: Path, info: dict[str, Any], samples: int) -> None:
        self.path, self.samples = path, samples
        self.names: list[str] = list(info["column_names"])
        self.encodings: list[str] = list(info["column_encodings"])
        self.sizes: list[int | None] = list(info["column_sizes"])
        self.var = [k for k, s in enumerate(self.sizes) if not s]
        self._mm: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_mm": None}  # workers map the file themselves

    @property
    def mm(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, np.uint8, mode="r")
        return self._mm

    def offsets(self) -> np.ndarray:
        return self.mm[4 : 4 * (self.samples + 2)].view("<u4").astype(np.int64)

    def layout(self, j: int) -> tuple[int, list[int]]:
        """The start of sample j's first column and every column's size; SkipSample when damaged."""
        begin, end = (int(x) for x in self.mm[4 * (j + 1) : 4 * (j + 3)].view("<u4"))
        head = 4 * len(self.var)
        if not begin + head <= end <= len(self.mm):
            raise SkipSample("corrupt", f"{self.path} sample {j}")
        var = iter(self.mm[begin : begin + head].view("<u4").tolist())
        sizes = [s if s else next(var) for s in self.sizes]
        if begin + head + sum(sizes) != end:
            raise SkipSample("corrupt", f"{self.path} sample {j}")
        return begin + head, sizes

    def read(self, j: int, columns: Sequence[str] | None, image: str) -> dict[str, Any]:
        """Sample j's `columns` (all readable ones when None): images as their raw bytes, text and
        numbers decoded; tensors and other columns daybreak does not use are left out."""
        start, sizes = self.layout(j)
        out: dict[str, Any] = {}
        for name, enc, size in zip(self.names, self.encodings, sizes):
            wanted = name in columns if columns is not None else (enc in _TEXT or enc in _NUMBER or name == image)
            if wanted and (enc in _TEXT or enc in _NUMBER or name == image):
                out[name] = _decode(enc, self.mm[start : start + size].tobytes(), name == image)
            start += size
        return out

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every sample at once: where each column starts, its size (both (n, columns)), and
        whether the sample's layout is consistent; read from the headers alone."""
        off = self.offsets()
        begin, end = off[:-1], off[1:]
        head = 4 * len(self.var)
        ok = (begin + head <= end) & (end <= len(self.mm))
        sizes = np.zeros((self.samples, len(self.names)), np.int64)
        for k, s in enumerate(self.sizes):
            sizes[:, k] = s or 0
        if self.var:
            safe = np.where(ok, begin, 0)
            idx = safe[:, None] + np.arange(head)[None, :]
            sizes[:, self.var] = self.mm[idx].view("<u4").reshape(self.samples, len(self.var))
        starts = begin[:, None] + head + np.cumsum(sizes, axis=1) - sizes
        ok &= begin + head + sizes.sum(axis=1) == end
        return starts, sizes, ok

    def number(self, column: str, starts: np.ndarray, ok: np.ndarray) -> np.ndarray:
        k = self.names.index(column)
        dtype = np.dtype(_NUMBER[self.encodings[k]])
        idx = np.where(ok, starts[:, k], 0)[:, None] + np.arange(dtype.itemsize)[None, :]
        return self.mm[idx].reshape(-1).view(dtype).astype(np.int64)


class MDSSource(_RowSource):
    """MDS shards under `path` (PRX's per-aspect layout included), read by sample index; remote
    shards (one index at the root) are downloaded whole into `cache_dir` first."""

    def __init__(
        self,
        path: str,
        cache_dir: str | Path | None = None,
        image_column: str = "image",
        caption_columns: Sequence[str] | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if "streaming" in sys.modules:  # whoever imported it may read these shards with its readers
            register_bf16()
        self.path, self.image_column, self.caption_columns = path, image_column, caption_columns
        self.max_pixels = max_pixels
        self.lost: Counter[str] = Counter()
        self.damaged: list[str] = []
        remote = "://" in path and not path.startswith("file://")
        if remote:
            roots = [self._download(path, cache_dir)]
        else:
            local = Path(path.removeprefix("file://"))
            roots = mds_roots(local)
            if not roots:
                raise UserError(f"data.path {path!r} has no MDS index.json (nor any folder below it with one)")
        self.indexes = [r / "index.json" for r in roots]
        self.shards: list[_Shard] = []
        for index in self.indexes:
            self._add(index)
        if not self.shards:
            raise UserError(f"no readable MDS shard under {path!r}: {self.damaged[0]}")
        self.lost = +self.lost
        self.offsets = np.cumsum([0] + [s.samples for s in self.shards])
        first = self.shards[0]
        self.columns = first.names
        self.light = [n for n, e in zip(first.names, first.encodings)
                      if n != image_column and (e in _TEXT or e in _NUMBER)]
        self.home = roots[0] if len(roots) == 1 else Path(path.removeprefix("file://"))
        if image_column not in self.columns:
            raise UserError(f"data.image_column {image_column!r} is not a column of {path!r} ({self.columns})")

    @staticmethod
    def _download(path: str, cache_dir: str | Path | None) -> Path:
        from streaming.base.storage.download import CloudDownloader

        if cache_dir is None:
            raise UserError(f"data.cache_dir is required for remote MDS data ({path})")
        local = Path(cache_dir)

        def fetch(name: str) -> None:
            if not (local / name).is_file():
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                CloudDownloader.get(path).download(f"{path.rstrip('/')}/{name}", str(local / name))

        fetch("index.json")
        try:
            shards = json.loads((local / "index.json").read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}/index.json is not an MDS index ({one_line(e)})") from e
        for obj in shards:
            name = obj["raw_data"]["basename"] if not obj.get("zip_data") else obj["zip_data"]["basename"]
            fetch(name)
        return local

    def _add(self, index: Path) -> None:
        """The shards of one index; damage goes to `damaged` / `lost`."""
        root = index.parent
        try:
            shards = json.loads(index.read_text())["shards"]
            assert isinstance(shards, list)
        except Exception as e:  # noqa: BLE001  (not JSON, not an index)
            below = [r for d in sorted(root.iterdir()) if d.is_dir() for r in mds_roots(d)]
            if below:  # PRX's merged index is damaged: its workers' own indexes still describe the shards
                self.damaged.append(f"{index}: not an MDS index ({type(e).__name__}); read the {len(below)} "
                                    "indexes below it instead")
                for r in below:
                    self._add(r / "index.json")
                return
            self.damaged.append(f"{index}: not an MDS index ({type(e).__name__})")
            self.lost["bad_index"] += 1
            return
        for obj in shards:
            try:
                if obj.get("format") != "mds":
                    raise ValueError(f"format {obj.get('format')!r}, not mds")
                samples = int(obj["samples"])
                raw = root / obj["raw_data"]["basename"]
                zipped = obj.get("zip_data")
                if not raw.is_file() and zipped and (root / zipped["basename"]).is_file():
                    from streaming.base.compression import decompress

                    packed = (root / zipped["basename"]).read_bytes()
                    raw.write_bytes(decompress(obj["compression"], packed))
                shard = _Shard(raw, obj, samples)
            except Exception as e:  # noqa: BLE001
                self.damaged.append(f"{index}: a shard entry it cannot describe ({one_line(e)})")
                self.lost["bad_index"] += 1
                continue
            if not raw.is_file():
                self.damaged.append(f"{raw}: missing ({samples} samples)")
                self.lost["missing_shard"] += samples
                continue
            size = raw.stat().st_size
            head = 4 * (samples + 2)
            stored = int(np.fromfile(raw, "<u4", count=1)[0]) if size >= 4 else -1
            if size < head or stored != samples:
                self.damaged.append(f"{raw}: its header does not match its index ({samples} samples lost)")
                self.lost["damaged_shard"] += samples
                continue
            ends = shard.offsets()[1:]
            whole = int(np.searchsorted(ends, size, side="right"))
            if whole < samples:
                self.damaged.append(f"{raw}: cut short, {samples - whole} of {samples} samples lost")
                self.lost["truncated_shard"] += samples - whole
                shard.samples = whole
            if shard.samples:
                self.shards.append(shard)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _where(self, i: int) -> tuple[_Shard, int]:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.shards[s], i - int(self.offsets[s])

    def string_columns(self) -> list[str]:
        """Text columns (`str` encoding: PRX's `id`, `style`, score strings, prompts alike) and the
        entries of a `captions` JSON column: candidates only, named by the config, never guessed."""
        return self._columns({c: e == "str" or c == "captions" for shard in self.shards[:1]
                              for c, e in zip(shard.names, shard.encodings)})

    def locate(self, i: int) -> str:
        shard, j = self._where(i)
        return f"{shard.path} sample {j}"

    def row(self, i: int, columns: Sequence[str] | None = None) -> dict[str, Any]:
        shard, j = self._where(i)
        return shard.read(j, columns, self.image_column)

    def fingerprint(self) -> str:
        from daybreak.data.meta import fingerprint

        return fingerprint(["mds", self.path, self.image_column, self.caption_columns, self.max_pixels],
                           [*self.indexes, *(s.path for s in self.shards)])

    def meta(self) -> Any:
        """Sizes from `width`/`height` columns and caption columns from the headers and text cells,
        shard by shard, without touching image bytes; without those columns, image headers."""
        from daybreak.data.meta import Meta

        if not self.sized:
            return super().meta()
        if not any("captions" in s.names for s in self.shards):
            return self._columnar_meta()
        rows: list[tuple[Any, Any]] = []
        for shard in self.shards:
            starts, sizes, ok = shard.table()
            w, h = shard.number("width", starts, ok), shard.number("height", starts, ok)
            text = [c for c, e in zip(shard.names, shard.encodings)
                    if (e == "str" and c not in ("key", "__key__", self.image_column)) or (c == "captions" and e == "json")]
            if self.caption_columns:
                text = [c for c in text if c in self.caption_columns or c == "captions"]
            cells = [(c, starts[:, shard.names.index(c)], sizes[:, shard.names.index(c)]) for c in text]
            for j in range(shard.samples):
                where = f"{shard.path} sample {j}"
                if not ok[j]:
                    rows.append(("corrupt", where))
                    continue
                try:
                    found: dict[str, Any] = {c: shard.mm[a[j] : a[j] + n[j]].tobytes().decode("utf-8")
                                             for c, a, n in cells}
                    if "captions" in found:
                        found["captions"] = json.loads(found["captions"])
                    caps = self._captions(found)
                    check_pixels(int(w[j]), int(h[j]), where, self.max_pixels)
                except SkipSample as e:
                    rows.append((e.reason, where))
                    continue
                except ValueError:  # text that is not UTF-8, JSON that does not parse
                    rows.append(("corrupt", where))
                    continue
                rows.append(((int(w[j]), int(h[j])), tuple(sorted(caps))))
        return Meta.from_rows(rows)

    def _text_columns(self, shard: _Shard) -> list[str]:
        text = [c for c, e in zip(shard.names, shard.encodings)
                if e == "str" and c not in ("key", "__key__", self.image_column)]
        return [c for c in text if c in self.caption_columns] if self.caption_columns else text

    def _columnar_meta(self) -> Any:
        """`meta()` as array operations over each shard's headers: a text cell is non-empty when one
        of its first 16 bytes is not ASCII white space (cells of white space only are read whole)."""
        from daybreak.data.meta import Meta
        from daybreak.data.sources import pixel_limit

        self._captions(self.shards[0].read(0, self._text_columns(self.shards[0]), self.image_column))
        columns = sorted({c for shard in self.shards for c in self._text_columns(shard)})
        n, limit = len(self), pixel_limit(self.max_pixels)
        meta = Meta(np.zeros((n, 2), np.int32), columns, np.zeros((n, len(columns)), bool), ["", "corrupt", "too_large"])
        space = np.frombuffer(b" \t\n\r\x0b\x0c", np.uint8)
        for s, shard in enumerate(self.shards):
            lo = int(self.offsets[s])
            rows = slice(lo, lo + shard.samples)
            starts, sizes, ok = shard.table()
            w, h = shard.number("width", starts, ok), shard.number("height", starts, ok)
            ok &= (w >= 1) & (h >= 1) & (w < 2**31) & (h < 2**31)
            big = ok & (w * h > limit)
            meta.sizes[rows] = np.stack([np.where(ok, w, 0), np.where(ok, h, 0)], 1)
            last = len(shard.mm) - 1
            for c in self._text_columns(shard):
                k = shard.names.index(c)
                a, m = np.where(ok, starts[:, k], 0), sizes[:, k]
                idx = np.minimum(a[:, None] + np.minimum(np.arange(16)[None, :], np.maximum(m - 1, 0)[:, None]), last)
                filled = ~np.isin(shard.mm[idx], space) & (np.arange(16)[None, :] < m[:, None])
                has = filled.any(axis=1)
                for j in np.flatnonzero(ok & ~has & (m > 16)):
                    has[j] = bool(shard.mm[a[j] : a[j] + m[j]].tobytes().decode("utf-8", "replace").strip())
                meta.present[rows, columns.index(c)] = has & ok
            meta.reason[rows] = np.where(~ok, 1, np.where(big, 2, 0))
            for j in np.flatnonzero(~ok | big):
                meta.where[lo + int(j)] = f"{shard.path} sample {j}"
        return meta
