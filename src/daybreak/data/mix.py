"""`data.mix`: several sources trained together as one map-style source.

The mix lays its entries out side by side in one index space, entry k taking m_k indices for its
n_k examples, with m_k proportional to its weight: the entry that its weight under-represents most
gets exactly its n_k, the others are repeated to reach their share (index j of entry k reads its
example j mod n_k). One epoch of the mix therefore shows every example of every entry at least once
and each entry in proportion to its weight, and the loader's seeded per-epoch permutation of these
indices gives an order that follows the weights, deterministically from the seed. Because the mix
is an ordinary map-style source, the loader's buckets, caption dropout, rank split and exact resume
work on it unchanged; `group(i)` names the entry an index draws from, which the loader counts as
`data/<name>`. Each entry's metadata table (sizes, caption columns) is its own, read or built once
and kept as a single source's is (`data/meta.py`), then laid out over the entry's indices; the
samples of damaged files the entries left out are counted together (`lost`), their files named.

Each entry keeps its own caption columns and weights (`captions`), so two datasets may name their
columns differently, or the same, without their weights mixing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daybreak.data.captions import CaptionMixer
from daybreak.data.holdout import training_part
from daybreak.data.meta import Meta, load_or_build
from daybreak.data.sources import Probe, Sample, open_source
from daybreak.errors import UserError


def entry_name(source: str, path: str | None) -> str:
    """An entry's default name: its path's last component (`shapes` for the synthetic source)."""
    return Path(str(path).rstrip("/")).name if path else source


class MixSource:
    """Entries `(name, source, weight)` as one source; see the module docstring for the layout."""

    def __init__(self, entries: Sequence[tuple[str, Any, float]], cache_dir: str | Path | None = None) -> None:
        if not entries:
            raise UserError("data.mix is empty")
        self.names = [name for name, _, _ in entries]
        self.sources = [source for _, source, _ in entries]
        sizes = np.array([len(s) for s in self.sources], dtype=np.float64)
        shares = np.array([w for _, _, w in entries], dtype=np.float64)
        shares /= shares.sum()
        scale = (sizes / shares).max()  # the index-space size at which no entry is cut short
        self.counts = [max(int(n), round(scale * p)) for n, p in zip(sizes, shares)]
        self.offsets = np.cumsum([0, *self.counts])
        self.cache_dir = cache_dir
        self.lost: Counter[str] = sum((Counter(getattr(s, "lost", {})) for s in self.sources), Counter())
        self.damaged = [f"{name}: {line}" for name, s in zip(self.names, self.sources)
                        for line in getattr(s, "damaged", [])]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def entry(self, i: int) -> tuple[int, int]:
        """(entry, index within the entry) of mix index `i`."""
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, (i - int(self.offsets[k])) % len(self.sources[k])

    def group(self, i: int) -> str:
        return self.names[self.entry(i)[0]]

    def locate(self, i: int) -> str:
        k, j = self.entry(i)
        return f"{self.names[k]}: {self.sources[k].locate(j)}"

    def key(self, i: int) -> str:
        k, j = self.entry(i)
        return f"{self.names[k]}/{self.sources[k].key(j)}"

    def captions(self, i: int) -> dict[str, str]:
        k, j = self.entry(i)
        return self.sources[k].captions(j)

    def probe(self, i: int) -> Probe:
        k, j = self.entry(i)
        return self.sources[k].probe(j)

    def raw_image(self, i: int) -> Any:
        k, j = self.entry(i)
        return self.sources[k].raw_image(j)

    def __getitem__(self, i: int) -> Sample:
        k, j = self.entry(i)
        sample = self.sources[k][j]
        return sample | {"key": f"{self.names[k]}/{sample['key']}"}

    def meta(self) -> Meta:
        """Every index's size and caption columns: each entry's table read or built once (kept as
        a single source's, in `cache_dir` or beside its data), then repeated over its indices."""
        parts = [load_or_build(source, self.cache_dir) for source in self.sources]
        columns = sorted({c for m in parts for c in m.columns})
        reasons = list(dict.fromkeys(r for m in parts for r in m.reasons))
        n = len(self)
        out = Meta(np.zeros((n, 2), np.int32), columns, np.zeros((n, len(columns)), bool), reasons,
                   np.zeros(n, np.uint8))
        for k, (m, lo, count) in enumerate(zip(parts, self.offsets, self.counts)):
            rows = slice(int(lo), int(lo) + count)
            own = np.arange(count) % len(m)
            out.sizes[rows] = m.sizes[own]
            out.present[rows, [columns.index(c) for c in m.columns]] = m.present[own]
            out.reason[rows] = np.array([reasons.index(r) for r in m.reasons], np.uint8)[m.reason[own]]
            for j in np.flatnonzero(m.reason[own]):
                out.where[int(lo) + int(j)] = f"{self.names[k]}: {m.where.get(int(own[j]), str(int(own[j])))}"
        return out


class MixCaptions:
    """Per-entry caption choice: index i's column is drawn with the weights of the entry it reads."""

    def __init__(self, mix: MixSource, weights: Sequence[dict[str, float]], seed: int = 0) -> None:
        self.mix = mix
        self.mixers = [CaptionMixer(w, seed) for w in weights]

    def column(self, available: dict[str, str], epoch: int, index: int) -> str | None:
        return self.mixers[self.mix.entry(index)[0]].column(available, epoch, index)


def named_columns(captions: dict[str, float], caption_columns: Sequence[str] | None = None) -> list[str] | None:
    """The caption columns a config names (`caption_columns`, then those `captions` weighs); None: none."""
    names = list(dict.fromkeys([*(caption_columns or []), *captions]))
    return names or None


def _open_entry(cfg: Any, i: int) -> Any:
    """The source of `data.mix`'s entry i, reading only the caption columns it names."""
    d, e = cfg.data, cfg.data.mix[i]
    return open_source(e.source, e.path, image_column=e.image_column, caption_columns=named_columns(e.captions),
                       caption_key=f"data.mix[{i}].captions", cache_dir=d.cache_dir, size=d.image_size,
                       seed=cfg.seed, length=d.length, max_pixels=d.max_pixels)


def open_first(cfg: Any) -> tuple[Any, CaptionMixer]:
    """(source, caption mixer) of the first data source: `data.mix`'s first entry, else the one source.
    The validation pass holds its examples out of the end of it (`data/holdout.py`)."""
    d = cfg.data
    if d.mix:
        return _open_entry(cfg, 0), CaptionMixer(d.mix[0].captions, cfg.seed)
    source = open_source(d.source, d.path, image_column=d.image_column,
                         caption_columns=named_columns(d.captions, d.caption_columns), cache_dir=d.cache_dir,
                         size=d.image_size, seed=cfg.seed, length=d.length, max_pixels=d.max_pixels)
    return source, CaptionMixer(d.captions, cfg.seed)


def open_data(cfg: Any, hold_out: int = 0) -> tuple[Any, Any]:
    """(source, caption mixer) of the `data` section: `data.mix` when it lists entries, else the
    one source of `data.source` / `data.path` / `data.captions`. The last `hold_out` examples of the
    first source are left out (the validation pass's, `data/holdout.py`)."""
    d = cfg.data
    first, mixer = open_first(cfg)
    first = training_part(first, hold_out, d.cache_dir)
    if not d.mix:
        return first, mixer
    sources = [first, *(_open_entry(cfg, i) for i in range(1, len(d.mix)))]
    mix = MixSource([(e.name, s, e.weight) for e, s in zip(d.mix, sources)], d.cache_dir)
    return mix, MixCaptions(mix, [e.captions for e in d.mix], cfg.seed)
