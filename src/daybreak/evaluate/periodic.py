"""Watching a run from the side: sample grids, and every `eval.every` steps the `eval.metrics` of the
EMA model as `eval/<name>`.

Watchers of the trainer (`after_step`, `after_final`): the trainer owns the weights and swaps its EMA
weights in for the call; this module only samples and scores. The `Evaluator` (extractors, reference
statistics) is built when the trainer starts, so a missing weight file stops the run before its first
step, not hours later.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daybreak.config import Config
from daybreak.evaluate.run import Evaluator
from daybreak.build import Parts
from daybreak.images import image_grid
from daybreak.io.checkpoint import step_dir_name
from daybreak.pipeline import Pipeline


GRID = 16  # eval images shown in the logger, with their prompts


class SampleGrids:
    """A grid of the EMA model's samples of `sample.prompts` (prompt i on seed `sample.seed + i`) every
    `train.sample_every` steps and once `final/` is written, as `samples/<step_N|final>.png` and in the
    logger under `samples` (TensorBoard, W&B). Every rank samples its share of the prompts (FSDP needs
    all of them in every forward); rank 0 gathers them and writes."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.every = cfg, cfg.train.sample_every

    def after_step(self, trainer, logger) -> None:
        if self.every and trainer.step % self.every == 0:
            self.grid(trainer, step_dir_name(trainer.step), logger)

    def after_final(self, trainer, logger) -> None:
        """The final grid; on a start that finds the run complete (no logger), only when it is missing: a
        run killed after `final/` and before its grid makes it then."""
        if logger is not None or not (trainer.run_dir / "samples" / "final.png").is_file():
            self.grid(trainer, "final", logger)

    def grid(self, trainer, name: str, logger) -> Path | None:
        """`samples/<name>.png` (its path on rank 0, None on the others)."""
        prompts, seed = self.cfg.sample.prompts, self.cfg.sample.seed
        with trainer.ema_weights() as parts:
            pipe = Pipeline(parts, self.cfg, trainer.device)
            images = trainer.dist.shared(len(prompts), lambda idx: pipe([prompts[i] for i in idx],
                                                                         seeds=[seed + i for i in idx]))
        if not trainer.dist.is_main:
            return None
        out = trainer.run_dir / "samples" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, captions=prompts).save(out)
        if logger is not None:
            logger.log_images(trainer.step, "samples", images, prompts)
        return out


class PeriodicEval:
    def __init__(self, cfg: Config, device: torch.device, *, cache_dir: str | None = None):
        self.cfg, self.device, self.every = cfg, device, cfg.eval.every
        self.images: list = []
        self.evaluator = Evaluator(cfg, cfg.eval.metrics, num=cfg.eval.num,
                                   cache_dir=cache_dir, device=device) if self.every > 0 else None

    def due(self, step: int) -> bool:
        return self.evaluator is not None and step > 0 and step % self.every == 0

    def after_step(self, trainer, logger) -> None:
        """Every rank generates its share of the prompts; rank 0 gathers, scores and logs."""
        if self.due(trainer.step):
            with trainer.ema_weights() as parts:
                values = self(parts, shared=trainer.dist.shared)
            if values is not None:
                logger.log(trainer.step, values)
                shown = min(GRID, len(self.images))
                logger.log_images(trainer.step, "eval/samples", self.images[:shown], self.evaluator.prompts[:shown])

    def after_final(self, trainer, logger) -> None:
        """Nothing at the end: evaluating `final/` is `daybreak eval`'s."""

    def __call__(self, parts: Parts, shared=None) -> dict[str, float] | None:
        """`{"eval/<metric>": value}` for the parts as they are now (the images stay in `images`); their
        train/eval modes are restored. `shared` (`Dist.shared`) splits the prompts over ranks: None on
        ranks other than 0."""
        modules = (parts.transformer, parts.text_encoder, parts.space)
        modes = [m.training for m in modules]
        pipe = Pipeline(parts, self.cfg, self.device)
        try:
            if shared is None:
                images = self.evaluator.generate(pipe)
            else:
                images = shared(self.evaluator.num, lambda idx: self.evaluator.generate(pipe, indices=idx))
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if images is None:
            return None
        self.images = images
        return {f"eval/{k}": v for k, v in self.evaluator.score(images).items()}
