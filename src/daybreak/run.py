"""A training run from a config: build the parts, the recipe, the data and the watchers, then fit.

This is where the pieces meet (`daybreak train`, `daybreak demo`, ablation studies and the Python
API's `daybreak.train` all come through here); the `Trainer` itself takes them ready-made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daybreak.build import build_parts, build_recipe
from daybreak.config import Config
from daybreak.data import build_data
from daybreak.evaluate.periodic import PeriodicEval
from daybreak.training.distributed import init_distributed, shutdown
from daybreak.training.trainer import Trainer


def build_trainer(cfg: Config, *, progress: bool = True, log=print) -> Trainer:
    """A `Trainer` for `cfg` with everything the config asks for."""
    dist = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg)
    ingredients = build_recipe(cfg, parts)
    say = log if dist.is_main else (lambda *_: None)
    # built now: a missing metric weight fails before step 1, not hours later
    watchers = [PeriodicEval(cfg, dist.device)] if cfg.eval.every > 0 else []
    data = build_data(cfg, rank=dist.rank, world_size=dist.world_size,
                      batch_size=cfg.train.global_batch // dist.world_size, patch=parts.pixels_per_token, log=say)
    return Trainer(cfg, parts, data, ingredients, watchers=watchers, progress=progress, log=log)


def train(cfg: Config, *, progress: bool = True) -> Path:
    """Train `cfg` (resuming from its run directory's newest checkpoint); returns the final checkpoint
    (or the step checkpoint written when a signal stopped the run)."""
    try:
        return build_trainer(cfg, progress=progress).fit()
    finally:
        shutdown()
