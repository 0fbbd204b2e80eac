"""`data.mix`: several sources trained together as one map-style source.

The mix lays its entries out side by side in one index space, entry k taking m_k indices for its
n_k examples, with m_k proportional to its weight: the entry that its weight under-represents most
gets exactly its n_k, the others are repeated to reach their share (index j of entry k reads its
example j mod n_k). One epoch of the mix therefore shows every example of every entry at least once
and each entry in proportion to its weight, and the loader's seeded per-epoch permutation of these
indices gives an order that follows the weights, deterministically from the seed. Because the mix
is an ordinary map-style source, the loader's buckets, caption dropout, rank split and exact resume
work on it unchanged; `group(i)` names the entry an index draws from, which the loader counts as
`data/<name>`.

Each entry keeps its own caption columns and weights (`captions`), so two datasets may name their
columns differently, or the same, without their weights mixing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daybreak.data.captions import CaptionMixer
from daybreak.data.sources import Probe, Sample, open_source
from daybreak.errors import UserError


def entry_name(source: str, path: str | None) -> str:
    """An entry's default name: its path's last component (`shapes` for the synthetic source)."""
    return Path(str(path).rstrip("/")).name if path else source


class MixSource:
    """Entries `(name, source, weight)` as one source; see the module docstring for the layout."""

    def __init__(self, entries: Sequence[tuple[str, Any, float]]) -> None:
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

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(entry, index within the entry) of mix index `i`."""
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, (i - int(self.offsets[k])) % len(self.sources[k])

    def group(self, i: int) -> str:
        return self.names[self.locate(i)[0]]

    def key(self, i: int) -> str:
        k, j = self.locate(i)
        return f"{self.names[k]}/{self.sources[k].key(j)}"

    def captions(self, i: int) -> dict[str, str]:
        k, j = self.locate(i)
        return self.sources[k].captions(j)

    def probe(self, i: int) -> Probe:
        k, j = self.locate(i)
        return self.sources[k].probe(j)

    def raw_image(self, i: int) -> Any:
        k, j = self.locate(i)
        return self.sources[k].raw_image(j)

    def __getitem__(self, i: int) -> Sample:
        k, j = self.locate(i)
        sample = self.sources[k][j]
        return sample | {"key": f"{self.names[k]}/{sample['key']}"}

    def meta(self) -> list:
        """Every index's (size, caption columns): each entry's examples read once, then repeated."""
        from daybreak.data.loader import SampleMeta

        rows: list = []
        for source, count in zip(self.sources, self.counts):
            own = SampleMeta(source).rows
            rows += [own[j % len(own)] for j in range(count)]
        return rows


class MixCaptions:
    """Per-entry caption choice: index i's column is drawn with the weights of the entry it reads."""

    def __init__(self, mix: MixSource, weights: Sequence[dict[str, float]], seed: int = 0) -> None:
        self.mix = mix
        self.mixers = [CaptionMixer(w, seed) for w in weights]

    def column(self, available: dict[str, str], epoch: int, index: int) -> str | None:
        return self.mixers[self.mix.locate(index)[0]].column(available, epoch, index)


def named_columns(captions: dict[str, float], caption_columns: Sequence[str] | None = None) -> list[str] | None:
    """The caption columns a config names (`caption_columns`, then those `captions` weighs); None: none."""
    names = list(dict.fromkeys([*(caption_columns or []), *captions]))
    return names or None


def open_data(cfg: Any) -> tuple[Any, Any]:
    """(source, caption mixer) of the `data` section: `data.mix` when it lists entries, else the
    one source of `data.source` / `data.path` / `data.captions`."""
    d = cfg.data
    common = {"cache_dir": d.cache_dir, "size": d.image_size, "seed": cfg.seed, "length": d.length}
    if not d.mix:
        source = open_source(d.source, d.path, image_column=d.image_column,
                             caption_columns=named_columns(d.captions, d.caption_columns), **common)
        return source, CaptionMixer(d.captions, cfg.seed)
    entries = []
    for i, e in enumerate(d.mix):
        source = open_source(e.source, e.path, image_column=e.image_column, caption_columns=named_columns(e.captions),
                             caption_key=f"data.mix[{i}].captions", **common)
        entries.append((e.name, source, e.weight))
    mix = MixSource(entries)
    return mix, MixCaptions(mix, [e.captions for e in d.mix], cfg.seed)
