"""Examples held out of training for the validation loss (`val` config section).

By default the held-out examples are the last `val.num` of the first training source (`data.source`,
or `data.mix`'s first entry), and the trainer's loader sees only the examples before them (`Head`),
so the validation loss is measured on images the model never trained on. With `val.data` (another
source) nothing is held out of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daybreak.data.meta import Meta, load_or_build
from daybreak.errors import UserError


def held_out(cfg) -> int:
    """How many examples at the end of the first training source the validation pass keeps for itself."""
    v = cfg.val
    return v.num if v.every > 0 and v.data is None else 0


class Head:
    """The first `n` examples of a source, with the same sample contract; what it does not define
    (`key`, `locate`, `raw_image`, `string_columns`, `lost`, ...) is the source's. It has no
    `fingerprint` of its own: its metadata is the source's table (read or built once and kept) cut
    to `n` rows."""

    def __init__(self, source: Any, n: int, cache_dir: str | Path | None = None) -> None:
        self.source, self.n, self.cache_dir = source, n, cache_dir

    def __getattr__(self, name: str) -> Any:
        if name in ("fingerprint", "source"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i

    def probe(self, i: int):
        return self.source.probe(self._index(i))

    def captions(self, i: int):
        return self.source.captions(self._index(i))

    def __getitem__(self, i: int):
        return self.source[self._index(i)]

    def meta(self) -> Meta:
        m = load_or_build(self.source, self.cache_dir)
        n = self.n
        return Meta(m.sizes[:n], m.columns, m.present[:n], m.reasons, m.reason[:n],
                    {i: w for i, w in m.where.items() if i < n})


def training_part(source: Any, k: int, cache_dir: str | Path | None = None) -> Any:
    """The part of `source` the loader may draw from: all of it, or all but its last `k` examples."""
    if not k:
        return source
    if k >= len(source):
        raise UserError(f"config key 'val.num'={k} holds out the whole training source ({len(source)} examples); "
                        f"lower it or give val.data")
    return Head(source, len(source) - k, cache_dir)
