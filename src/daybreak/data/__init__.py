"""Training data: sources (shapes, image folders, Hugging Face, WebDataset, MDS) and mixes of them, caption mixing,
aspect buckets and the resumable, rank-split loader the trainer iterates."""

from daybreak.data.buckets import Bucket, make_buckets, nearest_bucket, resolve_buckets, to_pixels, token_table
from daybreak.data.captions import CaptionMixer
from daybreak.data.holdout import held_out
from daybreak.data.loader import BucketLoader
from daybreak.data.mix import MixSource, open_data
from daybreak.data.sources import SOURCES, SkipSample, open_source


def build_data(cfg, *, rank: int = 0, world_size: int = 1, batch_size: int, patch: int = 32, log=print,
               batch_hook=None) -> BucketLoader:
    """The trainer's loader from the `data` config section: source (or `data.mix`) → caption mixer →
    buckets → batches; the validation pass's held-out examples are left out (`data/holdout.py`);
    `batch_hook` runs on each batch in the loader's workers (see `BucketLoader`)."""
    d = cfg.data
    source, mixer = open_data(cfg, hold_out=held_out(cfg))
    buckets = resolve_buckets(d.buckets, d.image_size, patch)
    if len(buckets) > 1:
        log(token_table(buckets, patch))
    return BucketLoader(source, batch_size=batch_size, buckets=buckets, caption_mixer=mixer,
                        seed=cfg.seed, rank=rank, world_size=world_size, num_workers=d.num_workers,
                        meta_cache=d.cache_dir, batch_hook=batch_hook)

__all__ = [
    "SOURCES",
    "Bucket",
    "BucketLoader",
    "CaptionMixer",
    "MixSource",
    "SkipSample",
    "build_data",
    "make_buckets",
    "nearest_bucket",
    "open_data",
    "open_source",
    "resolve_buckets",
    "to_pixels",
    "token_table",
]
