"""Parquet files and `save_to_disk` folders read in place, with random access and no copy.

`datasets.load_dataset("parquet", ...)` first converts the files into an Arrow copy in the HF
cache (for FLUX-Reason-6M, hundreds of GB more disk). Here parquet files (one, or a folder at any
nesting) are opened with pyarrow: their footers give each row group's row count, so sample i is
(file, row group, row); a row group is read when first needed, only the columns asked for, and
the few most recent are kept per process (shuffled reads cost one row group's column chunk each:
HF writes image datasets in row groups of ~100 rows). A `save_to_disk` folder is already Arrow:
its files are memory-mapped, so disk use stays the dataset's size either way.

Damage: a parquet file whose footer cannot be read, or an Arrow file cut short (its record
batches before the cut are kept), is named in `damaged` and counted in `lost`; a row group that
fails to decode makes its samples `unreadable`; nothing readable at all is one line naming the
first file.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daybreak.data.sources import SkipSample, _RowSource, check_pixels, one_line
from daybreak.errors import UserError

_KEEP = 4  # row groups kept in memory per process


def _save_to_disk_files(p: Path, split: str) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder (a DatasetDict's `split`), in order; else None."""
    if (p / "dataset_dict.json").is_file():
        p = p / split
    if not (p / "state.json").is_file():
        return None
    try:
        state = json.loads((p / "state.json").read_text())
        return [p / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p / 'state.json'} is not a `save_to_disk` state file ({one_line(e)})") from e


def in_place(path: str) -> bool:
    """Whether `path` is read here: a `save_to_disk` folder, a parquet file, or a folder of parquet."""
    p = Path(path)
    if not p.exists():
        return False
    if p.is_file():
        return p.suffix == ".parquet"
    if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
        return True
    files = [f for f in p.rglob("*") if f.suffix in (".parquet", ".json", ".jsonl", ".csv", ".arrow")]
    return bool(files) and all(f.suffix == ".parquet" for f in files)


class ArrowSource(_RowSource):
    """A parquet file or folder (any nesting), or a `save_to_disk` folder, read in place."""

    def __init__(self, path: str, image_column: str = "image", caption_columns: Sequence[str] | None = None,
                 split: str = "train", max_pixels: int | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = Path(path)
        self.path, self.image_column, self.caption_columns = path, image_column, caption_columns
        self.max_pixels = max_pixels
        self.lost: Counter[str] = Counter()
        self.damaged: list[str] = []
        arrow = _save_to_disk_files(p, split) if p.is_dir() else None
        self.kind = "arrow" if arrow is not None else "parquet"
        files = arrow if arrow is not None else ([p] if p.is_file() else sorted(p.rglob("*.parquet")))
        self.files: list[Path] = []
        self.chunks: list[tuple[int, int]] = []  # (file, row group or record batch)
        counts: list[int] = []
        schema = None
        self._batches: dict[int, list[Any]] = {}
        for f in files:
            try:
                if self.kind == "parquet":
                    meta = pq.ParquetFile(f).metadata
                    sizes = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
                    file_schema = meta.schema.to_arrow_schema()
                else:
                    batches, file_schema = self._read_arrow(f)
                    sizes = [b.num_rows for b in batches]
            except Exception as e:  # noqa: BLE001  (a footer or a stream that does not parse)
                self.damaged.append(f"{f}: unreadable ({one_line(e)})")
                self.lost["unreadable_file"] += 1
                continue
            schema = schema or file_schema
            k = len(self.files)
            self.files.append(f)
            self.chunks += [(k, c) for c in range(len(sizes))]
            counts += sizes
        if not self.files or not sum(counts):
            first = self.damaged[0] if self.damaged else f"{path}: no rows"
            raise UserError(f"no readable data in {first}")
        self.lost = +self.lost
        self.offsets = np.cumsum([0, *counts])
        self.columns = list(schema.names)
        if image_column not in self.columns:
            raise UserError(f"data.image_column {image_column!r} is not a column of {path!r} ({self.columns})")
        self.light = [f.name for f in schema if f.name != image_column and (
            pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_integer(f.type))]
        self._text = {f.name: pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or f.name == "captions"
                      for f in schema}
        self.home = p if p.is_dir() else p.parent
        self._cache: OrderedDict[tuple[int, tuple[str, ...] | None], Any] = OrderedDict()
        self._open: dict[int, Any] = {}
        self._lock = threading.Lock()  # the metadata pass probes from a thread pool

    def _read_arrow(self, f: Path) -> tuple[list[Any], Any]:
        """The record batches of an Arrow stream file, memory-mapped; a file cut short keeps the
        batches before the cut (and says so)."""
        import pyarrow as pa

        reader = pa.ipc.open_stream(pa.memory_map(str(f)))
        batches = []
        try:
            for batch in reader:
                batches.append(batch)
        except (pa.ArrowInvalid, OSError, EOFError) as e:
            self.damaged.append(f"{f}: cut short after {sum(b.num_rows for b in batches)} rows ({one_line(e)})")
            self.lost["truncated_file"] += 1
        self._batches[len(self.files)] = batches
        return batches, reader.schema

    def __getstate__(self) -> dict[str, Any]:
        # workers open the files
        return self.__dict__ | {"_cache": OrderedDict(), "_batches": {}, "_open": {}, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__ = state | {"_lock": threading.Lock()}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _chunk(self, c: int, columns: Sequence[str] | None) -> Any:
        """Chunk c as a pyarrow table of `columns` (all when None), read once and kept a while; one
        thread at a time (the kept tables and open files are shared, and pyarrow's file readers are
        not safe to share between threads)."""
        with self._lock:
            return self._read_chunk(c, columns)

    def _read_chunk(self, c: int, columns: Sequence[str] | None) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        key = (c, tuple(columns) if columns is not None else None)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        k, part = self.chunks[c]
        if self.kind == "parquet":
            if k not in self._open:
                self._open[k] = pq.ParquetFile(self.files[k])  # its footer parsed once per process
            pf = self._open[k]
            cols = [n for n in columns if n in pf.schema_arrow.names] if columns is not None else None
            table = pf.read_row_group(part, columns=cols)
        else:
            if k not in self._batches:
                self._batches[k] = list(pa.ipc.open_stream(pa.memory_map(str(self.files[k]))))
            batch = self._batches[k][part]
            cols = [n for n in columns if n in batch.schema.names] if columns is not None else batch.schema.names
            table = pa.Table.from_batches([batch.select(cols)])
        self._cache[key] = table
        if len(self._cache) > _KEEP:
            self._cache.popitem(last=False)
        return table

    def _where(self, i: int) -> tuple[int, int]:
        c = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return c, i - int(self.offsets[c])

    def string_columns(self) -> list[str]:
        return self._columns(self._text)

    def locate(self, i: int) -> str:
        c, j = self._where(i)
        k, part = self.chunks[c]
        unit = "row group" if self.kind == "parquet" else "batch"
        return f"{self.files[k]} {unit} {part} row {j}"

    def row(self, i: int, columns: Sequence[str] | None = None) -> dict[str, Any]:
        c, j = self._where(i)
        return self._chunk(c, columns).slice(j, 1).to_pylist()[0]

    def fingerprint(self) -> str:
        from daybreak.data.meta import fingerprint

        return fingerprint(["arrow", self.path, self.image_column, self.caption_columns, self.max_pixels], self.files)

    def meta(self) -> Any:
        """Sizes from `width`/`height` columns and caption columns from the text columns, a chunk
        at a time (no image bytes read); without those columns, image headers."""
        from daybreak.data.meta import Meta

        if not self.sized:
            return super().meta()
        rows: list[tuple[Any, Any]] = []
        for c in range(len(self.chunks)):
            n = int(self.offsets[c + 1] - self.offsets[c])
            try:
                cells = self._chunk(c, self.light).to_pylist()
            except Exception:  # noqa: BLE001  (a damaged row group: its rows are lost)
                rows += [("unreadable", self.locate(int(self.offsets[c]) + j)) for j in range(n)]
                continue
            for j, row in enumerate(cells):
                where = self.locate(int(self.offsets[c]) + j)
                try:
                    size = self._size(row, int(self.offsets[c]) + j)
                    caps = self._captions(row)
                    check_pixels(*size, where, self.max_pixels)
                except SkipSample as e:
                    rows.append((e.reason, where))
                    continue
                rows.append((size, tuple(sorted(caps))))
        return Meta.from_rows(rows)
