"""The training data loader: one aspect bucket per step, identical plan on every rank, exact resume.

A global sampler, run identically on every rank, walks a per-epoch permutation of the source
(seeded by (seed, epoch)), looks up each example's size and caption columns, picks its caption
column and its bucket, and appends it to that bucket's pending list. Sizes and caption columns
come from the dataset's metadata table (`data/meta.py`: built once by rank 0, from `width`/`height`
columns or image headers, kept beside the data or in `data.cache_dir`, read by the other ranks and
by restarts) and then from memory: the sampler never reads an image, so a rank's per-step reading
is its own slice of the global batch, not all of it. When a list holds
`batch_size × world_size` examples it becomes the step's global batch; rank r takes slice r. So all
ranks train on the same bucket at a given step and their samples are disjoint. Pending examples
carry over epoch boundaries (nothing is dropped). Decoding and resizing, the expensive part, run
in DataLoader workers and only for the rank's own slice; batches travel as uint8 (a quarter of
fp32's bytes through the workers' shared memory and the host-to-device copy; the trainer converts
them on the device) and are pinned when CUDA is present. A `batch_hook` given by the caller (the
text cache's lookup) runs on each batch in the workers too, adding tensors that travel the same way.

Resume is exact: `state_dict()` is the sampler state after the last batch *handed out* (workers
prefetch ahead; their plans are not counted), i.e. (epoch, position in the permutation, pending
lists of (index, caption column), skip counters). Loading it into a fresh loader with the same
source, buckets, seed and global batch reproduces the remaining batches bit for bit, whatever
`num_workers` and however the global batch is split into ranks.

Bad data: examples whose probe fails (`empty`, `not_image`, `truncated`, `too_large`, ...) or that
have no usable caption (`no_caption`) never enter a batch; they are counted once (in the first
pass) under `skipped/<reason>` (the same on every rank), with the samples of damaged files the
source left out (its `lost`). An image that passes the probe but fails to decode, whatever the
exception, is replaced in its micro batch by another of the batch's images (shapes stay fixed)
and counted once under `replaced/<reason>` (this rank only). The first few bad samples are logged
as warnings naming their files.

A source that groups its examples (a `data.mix`: `source.group(i)` names the entry) has the examples
handed out counted per group (`data/<name>`, global, cumulative, part of the resumable state).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from daybreak.data.buckets import Bucket, nearest_bucket, resize_to_bucket, uint8_chw
from daybreak.data.captions import CaptionMixer
from daybreak.data.meta import Meta, load_or_build
from daybreak.data.sources import SkipSample, one_line
from daybreak.errors import UserError

log = logging.getLogger(__name__)
_WARN_FIRST = 5
Plan = tuple[int, list[tuple[int, str]]]  # (bucket index, [(source index, caption column)])


def _where(source: Any, index: int) -> str:
    """Where example `index` lives, for the log (its file when the source knows it)."""
    locate = getattr(source, "locate", None)
    return locate(index) if callable(locate) else str(index)


class _RankSlices(Dataset):
    """Worker side: decode a rank's slice of a global step into one bucket-sized batch."""

    def __init__(self, source: Any, buckets: Sequence[Bucket], hook: Callable[[dict], dict] | None = None) -> None:
        self.source, self.buckets, self.hook = source, list(buckets), hook

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, plan: Plan) -> dict[str, Any]:
        bucket = self.buckets[plan[0]]
        good: list[tuple[np.ndarray, str, str]] = []
        failed: list[tuple[str, str]] = []
        for index, column in plan[1]:
            try:
                sample = self.source[index]
                if column not in sample["captions"]:
                    raise SkipSample("no_caption", _where(self.source, index))
                good.append((resize_to_bucket(sample["image"], bucket), sample["captions"][column], sample["key"]))
            except SkipSample as e:
                failed.append((index, e.reason, e.key or _where(self.source, index)))
            except Exception as e:  # noqa: BLE001  (whatever reading a sample raises, it is one bad sample)
                failed.append((index, "unreadable", f"{_where(self.source, index)} ({one_line(e)})"))
        if not good:
            raise UserError(
                f"every image of a batch failed to decode ({[f[1:] for f in failed]}); "
                "check the data with `daybreak data inspect`"
            )
        rows = [good[k % len(good)] for k in range(len(plan[1]))]
        batch = {
            "pixels": uint8_chw(np.stack([r[0] for r in rows])),
            "captions": [r[1] for r in rows],
            "keys": [r[2] for r in rows],
            "failed": failed,
        }
        return self.hook(batch) if self.hook is not None else batch


class BucketLoader:
    """Infinite iterator of `{"pixels": (B,3,H,W) uint8, "captions": [str], "keys": [str]}`
    (`buckets.bytes_to_pixels` maps pixels to [−1, 1])."""

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        buckets: Sequence[Bucket],
        caption_mixer: CaptionMixer | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        shuffle: bool = True,
        batch_hook: Callable[[dict], dict] | None = None,
        meta_cache: str | None = None,
    ) -> None:
        if not 0 <= rank < world_size or batch_size < 1:
            raise UserError(
                f"bad loader layout: rank {rank}, world_size {world_size}, batch_size {batch_size}"
            )
        self.source, self.buckets = source, list(buckets)
        self.mixer = caption_mixer or CaptionMixer(seed=seed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.batch_hook = batch_hook  # run on each batch in the workers; never touches the sampler's state
        self._state: dict[str, Any] = {"epoch": 0, "position": 0, "pending": {}, "skipped": {}, "drawn": {}}
        self._replaced: Counter[str] = Counter()
        self._replaced_seen: set[int] = set()
        self._warned = 0
        self._meta: Meta | None = None
        self.meta_cache = meta_cache

    @property
    def meta(self) -> Meta:
        """Every example's size and caption columns: read on first use (from the table rank 0 keeps
        beside the data or in `meta_cache`, see `data/meta.py`) and kept."""
        if self._meta is None:
            self._meta = load_or_build(self.source, self.meta_cache)
            lost = getattr(self.source, "damaged", [])
            for line in lost[:_WARN_FIRST]:
                log.warning("damaged data left out: %s", line)
        return self._meta

    # -- the global sampler (main process, same on every rank) ------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _warn(self, reason: str, key: str) -> None:
        if self._warned < _WARN_FIRST:
            self._warned += 1
            log.warning("skipping bad data (%s): %s", reason, key)

    def _plans(self, snapshots: deque[dict[str, Any]]) -> Iterator[Plan]:
        st = copy.deepcopy(self._state)
        pending = {int(b): [(int(i), str(c)) for i, c in v] for b, v in st["pending"].items()}
        meta = self.meta
        skipped, drawn = Counter(st["skipped"]), Counter(st["drawn"])
        group = getattr(self.source, "group", None)
        n, since_valid = len(self.source), 0
        order = self._order(st["epoch"])
        while True:
            if st["position"] >= n:
                st["epoch"], st["position"] = st["epoch"] + 1, 0
                order = self._order(st["epoch"])
            index = int(order[st["position"]])
            st["position"] += 1
            since_valid += 1
            if since_valid > n:
                raise UserError(f"no usable example in the whole data source (skipped: {dict(skipped)})")
            try:
                size, captions = meta[index]
                column = self.mixer.column(captions, st["epoch"], index)
                if column is None:
                    raise SkipSample("no_caption", _where(self.source, index))
            except SkipSample as e:
                if st["epoch"] == 0:  # a bad example is bad in every pass: counted (and named) once
                    skipped[e.reason] += 1
                    self._warn(e.reason, e.key)
                continue
            since_valid = 0
            b = self.buckets.index(nearest_bucket(size[0], size[1], self.buckets))
            items = pending.setdefault(b, [])
            items.append((index, column))
            if len(items) == self.global_batch:
                pending[b] = []
                if group is not None:
                    drawn.update(group(i) for i, _ in items)
                snapshots.append(
                    {
                        "epoch": st["epoch"],
                        "position": st["position"],
                        "pending": {b_: [list(x) for x in v] for b_, v in pending.items() if v},
                        "skipped": dict(skipped),
                        "drawn": dict(drawn),
                    }
                )
                lo = self.rank * self.batch_size
                yield b, items[lo : lo + self.batch_size]

    # -- public API ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        snapshots: deque[dict[str, Any]] = deque()
        loader = DataLoader(
            _RankSlices(self.source, self.buckets, self.batch_hook),
            batch_size=None,
            sampler=self._plans(snapshots),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        for batch in loader:
            self._state = snapshots.popleft()
            for index, reason, key in batch.pop("failed"):
                if index not in self._replaced_seen:  # once per example, however many passes
                    self._replaced_seen.add(index)
                    self._replaced[reason] += 1
                    self._warn(reason, key)
            yield batch

    def stats(self) -> dict[str, int]:
        """Counters for metrics.jsonl: `skipped/<reason>` (global), `replaced/<reason>` (this rank) and, for
        a mix, `data/<name>` (global: the examples drawn from each entry so far)."""
        skipped = Counter(self._state["skipped"]) + Counter(getattr(self.source, "lost", {}))
        out = {f"skipped/{k}": v for k, v in sorted(skipped.items())}
        out |= {f"replaced/{k}": v for k, v in sorted(self._replaced.items())}
        out["skipped/total"] = sum(skipped.values())
        out["epoch"] = self._state["epoch"]
        drawn = dict.fromkeys(getattr(self.source, "names", ()), 0) | self._state["drawn"]
        return out | {f"data/{k}": v for k, v in drawn.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, strings, lists, dicts): safe for torch.save and JSON."""
        state = copy.deepcopy(self._state)
        state["pending"] = {str(b): v for b, v in state["pending"].items()}
        return state | {
            "replaced": dict(self._replaced),
            "replaced_seen": sorted(self._replaced_seen),
            "global_batch": self.global_batch,
            "num_examples": len(self.source),
            "buckets": [list(b) for b in self.buckets],
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {
            "global_batch": self.global_batch,
            "num_examples": len(self.source),
            "buckets": [list(b) for b in self.buckets],
            "seed": self.seed,
        }
        for name, value in mine.items():
            if state[name] != value:
                raise UserError(
                    f"the checkpoint's data loader has {name}={state[name]}, this run {value}: "
                    "resume needs the same data layout"
                )
        self._state = {k: copy.deepcopy(state[k]) for k in ("epoch", "position", "pending", "skipped", "drawn")}
        self._replaced = Counter(state["replaced"])
        self._replaced_seen = set(state["replaced_seen"])
