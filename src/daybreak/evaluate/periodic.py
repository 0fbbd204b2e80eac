"""Evaluation during training: every `eval.every` steps, on rank 0, the `eval.metrics` as `eval/<name>`.

The trainer owns the weights, so it swaps its EMA weights in before the call and back after; this
module only samples and scores. The `Evaluator` (extractors, reference statistics) is built when
the trainer starts, so a missing weight file stops the run before its first step, not hours later.
"""

from __future__ import annotations

import torch

from daybreak.config import Config
from daybreak.evaluate.run import Evaluator
from daybreak.pipeline import Parts, Pipeline


class PeriodicEval:
    def __init__(self, cfg: Config, device: torch.device, *, cache_dir: str | None = None):
        self.cfg, self.device, self.every = cfg, device, cfg.eval.every
        self.evaluator = Evaluator(cfg, cfg.eval.metrics, num=cfg.eval.num,
                                   cache_dir=cache_dir, device=device) if self.every > 0 else None

    def due(self, step: int) -> bool:
        return self.evaluator is not None and step > 0 and step % self.every == 0

    def __call__(self, parts: Parts) -> dict[str, float]:
        """`{"eval/<metric>": value}` for the parts as they are now; their train/eval modes are restored."""
        modules = (parts.transformer, parts.text_encoder, parts.space)
        modes = [m.training for m in modules]
        try:
            images = self.evaluator.generate(Pipeline(parts, self.cfg, self.device))
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return {f"eval/{k}": v for k, v in self.evaluator.score(images).items()}
