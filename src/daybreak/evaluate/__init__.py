"""Measuring models: metrics, feature extractors, eval runs, periodic eval, ablation studies, reports.

Heavy modules are imported where used; this package only names the entry points.
"""

from daybreak.evaluate.metrics import clip_score, frechet_distance, mmd

__all__ = ["clip_score", "frechet_distance", "mmd"]
