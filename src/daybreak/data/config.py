"""Config sections `data` (and `val.data`) and the entries of `data.mix`, read by `daybreak.data`."""

from __future__ import annotations

from dataclasses import dataclass, field

from daybreak.data.buckets import BUCKETS
from daybreak.data.mix import entry_name
from daybreak.data.sources import SOURCES
from daybreak.errors import UserError
from daybreak.schema import ranged


@dataclass
class MixEntry:
    """One source of `data.mix`: the single-source keys, plus its relative share of the samples."""

    name: str | None = None  # default: the path's last component; metrics.jsonl counts it as data/<name>
    source: SOURCES.choices | None = None
    path: str | None = None
    weight: float = ranged(1.0, gt=0)
    captions: dict[str, float] = ranged(default_factory=dict, ge=0)  # column → weight, as data.captions
    image_column: str = "image"


@dataclass
class DataConfig:
    """Config section `data`: one source (or a mix of them), its captions, buckets and loader."""

    source: SOURCES.choices = "shapes"
    path: str | None = None
    image_size: int = ranged(32, ge=1)  # base resolution: the square bucket's side, or the aspect buckets' base
    buckets: BUCKETS.choices = "square"  # aspect: sides multiple of 16, aspect 0.5-2, ~image_size² pixels
    captions: dict[str, float] = ranged(default_factory=dict, ge=0)  # column → weight; {}: the named columns equally
    image_column: str = "image"
    caption_columns: list[str] | None = None  # the caption columns (default: those `captions` weighs, else the
    # data's only string column; data with several string columns and none named is refused)
    length: int = ranged(100_000, ge=1)  # shapes: dataset size
    num_workers: int = ranged(0, ge=0)
    cache_dir: str | None = None  # remote streaming sources: local shard cache; the sample-metadata table
    max_pixels: int | None = ranged(None, ge=1)  # images with more pixels are skipped (too_large); None: PIL's bomb limit
    # several sources trained together; non-empty, it replaces data.source / data.path / data.captions
    mix: list[MixEntry] = field(default_factory=list)

    def check(self, key: str = "data") -> None:
        """What the field types cannot say: a path for every source but shapes; the mix entries' names
        filled in (the path's last component) and unique. `key`: the section's dotted key."""
        if not self.mix and self.source != "shapes" and not self.path:
            raise UserError(f"{key}.path is required for {key}.source={self.source}")
        seen: set[str] = set()
        for i, e in enumerate(self.mix):
            at = f"{key}.mix[{i}]"
            if e.source is None:
                raise UserError(f"config key '{at}.source' is required (one of {', '.join(SOURCES)})")
            if e.source != "shapes" and not e.path:
                raise UserError(f"config key '{at}.path' is required for source {e.source}")
            e.name = e.name or entry_name(e.source, e.path)
            if e.name in seen:
                raise UserError(f"{key}.mix has two entries named '{e.name}': set {at}.name")
            seen.add(e.name)
