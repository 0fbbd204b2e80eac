"""What the sampler needs of every example (size, non-empty caption columns, or why it is bad),
read once per dataset and kept next to the data or in `data.cache_dir`.

Placing an example in an aspect bucket needs its size; choosing its caption needs which caption
columns it has. Reading that for millions of examples on every rank at every start would be a pass
over the whole dataset per rank, so it is read once: from `width`/`height` columns when the data
has them (MDS, parquet/Arrow: no image byte is read), else from image headers; then saved as one
`.npz` keyed by the source's fingerprint (its files, sizes and modification times and the reading
options). Rank 0 builds and writes it; the other ranks wait for the file and read it; a restart
(or a second run on the same data) reads it. Arrays, not Python objects, hold the table: 8.7 M
examples take ~100 MB.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daybreak.data.sources import SkipSample, one_line

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the table's layout changes: old files are then ignored


@dataclass
class Meta:
    """Per example: `sizes[i]` = (width, height); `present[i, c]` whether caption column
    `columns[c]` is non-empty; `reason[i]` > 0 names `reasons[reason[i]]` when the example is bad,
    and `where[i]` says where it is (a file, a shard and row) for the log."""

    sizes: np.ndarray
    columns: list[str]
    present: np.ndarray
    reasons: list[str] = field(default_factory=lambda: [""])
    reason: np.ndarray | None = None
    where: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reason is None:
            self.reason = np.zeros(len(self.sizes), np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[tuple[int, int], dict[str, str]]:
        """(size, {column: "x"}) as `probe` gives it, for the caption mixer (which looks only at which
        columns are non-empty); raises the example's `SkipSample`."""
        r = int(self.reason[i])
        if r:
            raise SkipSample(self.reasons[r], self.where.get(i, str(i)))
        w, h = self.sizes[i]
        return (int(w), int(h)), {c: "x" for c, p in zip(self.columns, self.present[i]) if p}

    def mark(self, i: int, reason: str, where: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.reason[i] = self.reasons.index(reason)
        self.where[i] = where

    def counts(self) -> dict[str, int]:
        """Bad examples by reason."""
        n = np.bincount(self.reason, minlength=len(self.reasons))
        return {r: int(n[k]) for k, r in enumerate(self.reasons) if k and n[k]}

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[Any, Any]]) -> "Meta":
        """From `((w, h), caption columns)` rows, or `(reason, where)` rows for bad examples."""
        rows = list(rows)
        columns = sorted({c for size, cols in rows if not isinstance(size, str) for c in cols})
        meta = cls(np.zeros((len(rows), 2), np.int32), columns, np.zeros((len(rows), len(columns)), bool))
        col = {c: k for k, c in enumerate(columns)}
        for i, (size, cols) in enumerate(rows):
            if isinstance(size, str):
                meta.mark(i, size, cols)
                continue
            meta.sizes[i] = size
            for c in cols:
                meta.present[i, col[c]] = True
        return meta

    def save(self, path: Path) -> None:
        from daybreak.io.store import atomic_write

        header = {"format": FORMAT, "columns": self.columns, "reasons": self.reasons,
                  "where": {str(k): v for k, v in self.where.items()}}
        buf = io.BytesIO()
        np.savez(buf, sizes=self.sizes, present=self.present, reason=self.reason,
                 header=np.frombuffer(json.dumps(header).encode(), np.uint8))
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))

    @classmethod
    def load(cls, path: Path) -> "Meta | None":
        """The table in `path`, or None when it is missing, unreadable or of another format."""
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes())
                if header.get("format") != FORMAT:
                    return None
                return cls(z["sizes"], header["columns"], z["present"], header["reasons"], z["reason"],
                           {int(k): v for k, v in header["where"].items()})
        except Exception:  # noqa: BLE001  (a damaged cache file, whatever the damage, is rebuilt)
            return None


def probe_rows(n: int, probe: Callable[[int], tuple[Any, dict[str, str]]],
               where: Callable[[int], str], threads: int = 8) -> Meta:
    """The table from `probe(i)` (image header + captions) over a thread pool (file reads release the
    GIL); any exception is the example's reason (`SkipSample`'s, else `unreadable`)."""

    def one(i: int) -> tuple[Any, Any]:
        try:
            size, captions = probe(i)
        except SkipSample as e:
            return e.reason, e.key or where(i)
        except Exception as e:  # noqa: BLE001  (whatever a file does, it is one bad example)
            return "unreadable", f"{where(i)} ({one_line(e)})"
        return (int(size[0]), int(size[1])), tuple(sorted(c for c, v in captions.items() if (v or "").strip()))

    with ThreadPoolExecutor(threads) as pool:
        return Meta.from_rows(pool.map(one, range(n), chunksize=64))


def build(source: Any) -> Meta:
    """The source's own `meta()`, or its `probe(i)` over every example."""
    if hasattr(source, "meta"):
        return source.meta()
    locate = getattr(source, "locate", str)
    return probe_rows(len(source), source.probe, locate)


def fingerprint(parts: Sequence[Any], files: Iterable[str | Path] = ()) -> str:
    """A short hash of the reading options `parts` and each file's path, size and modification time."""
    h = hashlib.sha256(json.dumps([FORMAT, *map(str, parts)]).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _is_leader() -> bool:
    """Rank 0 of the job (the process group's, else torchrun's RANK); a lone process leads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def candidates(source: Any, cache_dir: str | Path | None) -> list[Path]:
    """Where the table may live, in order: `data.cache_dir/meta/` when set, else beside the data
    (when it is a local folder), then the user cache (`$XDG_CACHE_HOME/daybreak/meta`)."""
    name = f"{source.fingerprint()}.npz"
    if cache_dir is not None:
        return [Path(cache_dir) / "meta" / name]
    out = []
    home = getattr(source, "home", None)
    if home is not None:
        out.append(Path(home) / ".daybreak-meta" / name)
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return out + [xdg / "daybreak" / "meta" / name]


def load_or_build(source: Any, cache_dir: str | Path | None = None, *, leader: bool | None = None,
                  poll: float = 0.5, patience: float = 3600.0) -> Meta:
    """The source's table: read from its cache file when there is one; else built (by the leader,
    who writes it; the others wait for the file, and after `patience` seconds without it, from a
    leader that could not write it or a folder they do not share, build it themselves). A source
    without a fingerprint (the synthetic shapes, which know theirs without drawing; a wrapper) is
    built in memory on every rank."""
    if not hasattr(source, "fingerprint"):
        return build(source)
    paths = candidates(source, cache_dir)
    for p in paths:
        if p.is_file() and (meta := Meta.load(p)) is not None and len(meta) == len(source):
            return meta
    if leader is None:
        leader = _is_leader()
    if not leader:
        start, said = time.monotonic(), 0.0
        while True:
            for p in paths:
                if p.is_file() and (meta := Meta.load(p)) is not None and len(meta) == len(source):
                    return meta
            waited = time.monotonic() - start
            if waited > patience:
                log.warning("no sample metadata from rank 0 after %.0f s: reading it on this rank", waited)
                return build(source)
            if waited - said >= 60:
                said = waited
                log.warning("waiting %.0f s for rank 0 to write the sample metadata (%s; data.cache_dir must be "
                            "a folder every rank sees)", waited, " or ".join(map(str, paths)))
            time.sleep(poll)
    start = time.monotonic()
    meta = build(source)
    for p in paths:
        try:
            meta.save(p)
        except OSError:
            continue
        log.info("sample metadata of %d examples read in %.1f s, kept in %s", len(meta), time.monotonic() - start, p)
        break
    else:
        log.warning("could not write the sample metadata to %s: every rank reads it itself", " or ".join(map(str, paths)))
    return meta
