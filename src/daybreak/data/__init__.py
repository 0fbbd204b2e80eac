"""Training data: sources (shapes, image folders, Hugging Face, WebDataset, MDS), caption mixing,
aspect buckets and the resumable, rank-split loader the trainer iterates."""

from daybreak.data.buckets import Bucket, make_buckets, nearest_bucket, resolve_buckets, to_pixels, token_table
from daybreak.data.captions import CaptionMixer
from daybreak.data.loader import BucketLoader, build_loader
from daybreak.data.sources import SOURCES, SkipSample, open_source

__all__ = [
    "SOURCES",
    "Bucket",
    "BucketLoader",
    "CaptionMixer",
    "SkipSample",
    "build_loader",
    "make_buckets",
    "nearest_bucket",
    "open_source",
    "resolve_buckets",
    "to_pixels",
    "token_table",
]
