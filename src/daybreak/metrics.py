"""`daybreak.metrics`: the public home of the metric functions (implemented in evaluate/metrics)."""

from daybreak.evaluate.metrics import (
    clip_score,
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    mmd,
)

__all__ = ["clip_score", "feature_stats", "frechet_distance", "frechet_from_stats", "mmd"]
