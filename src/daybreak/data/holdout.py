"""Examples held out of training for the validation loss (`val` config section).

By default the held-out examples are the last `val.num` of the training source, and the trainer's
loader sees only the examples before them (`Head`), so the validation loss is measured on images the
model never trained on. With `val.data` (another source) nothing is held out of training.
"""

from __future__ import annotations

from typing import Any

from daybreak.errors import UserError


def held_out(cfg) -> int:
    """How many examples at the end of the training source the validation pass keeps for itself."""
    v = cfg.val
    return v.num if v.every > 0 and v.data is None else 0


class Head:
    """The first `n` examples of a source, with the same sample contract (`len`, `probe`, `[i]`, `meta`)."""

    def __init__(self, source: Any, n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i

    def probe(self, i: int):
        return self.source.probe(self._index(i))

    def __getitem__(self, i: int):
        return self.source[self._index(i)]

    def meta(self):
        rows = self.source.meta() if hasattr(self.source, "meta") else None
        return None if rows is None else rows[: self.n]


def training_part(source: Any, cfg) -> Any:
    """The part of the training source the loader may draw from (all of it unless examples are held out)."""
    k = held_out(cfg)
    if not k:
        return source
    if k >= len(source):
        raise UserError(f"config key 'val.num'={k} holds out the whole training source ({len(source)} examples); "
                        f"lower it or give val.data")
    return Head(source, len(source) - k)
