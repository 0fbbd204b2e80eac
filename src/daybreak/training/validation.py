"""The validation loss per noise bin: a loss that compares across steps, runs and seeds.

PRX's ablation framework scores every run with a validation MSE per timestep bin (`loss_bins`
[0, 0.3), [0.3, 0.6), [0.6, 1.0] in its Flux-Baseline config). A training loss cannot do that: its t
and noise are drawn anew every step, so two runs (or two steps) see different noise levels. Here every
held-out example gets, per bin, one fixed t and one fixed noise tensor, drawn from a generator keyed on
(`val.seed`, example, bin): the same weights always give the same numbers, whatever the world size.
Within a bin the examples' t are stratified (example j of N sits in its own 1/N slice of the bin, the
slices shuffled across examples), so a bin's mean covers the whole bin evenly.

The loss is the run denoiser's own per-sample flow loss (velocity-space MSE for x-prediction, v-MSE for
v-prediction), on the conditional model (no caption dropout), with the EMA weights when EMA is on and
the dense forward (no routing: the model as it samples). Logged as `val/loss` (the mean over the bins)
and `val/loss_<lo>-<hi>` with the edges as configured (`val/loss_0.0-0.3`).

Held-out examples: the last `val.num` of the training source (`daybreak.data.holdout` keeps them out
of the loader), or the first `val.num` of `val.data`. Under torchrun the (example, bin) items are split
across ranks in equal numbers of forward passes (FSDP needs every rank in every forward); padding
items weigh 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from daybreak.build import Parts
from daybreak.data.buckets import nearest_bucket, resize_to_bucket, resolve_buckets, uint8_to_pixels
from daybreak.data.captions import CaptionMixer
from daybreak.data.mix import named_columns, open_first
from daybreak.data.sources import SkipSample, open_source
from daybreak.diffusion.objective import sample_key
from daybreak.errors import UserError
from daybreak.training.distributed import Dist


def bin_name(lo: float, hi: float) -> str:
    """The metric of one bin, its edges as configured: `val/loss_0.0-0.3`."""
    return f"val/loss_{float(lo)}-{float(hi)}"


def strata(seed: int, count: int, bin_index: int) -> torch.Tensor:
    """Which 1/count slice of bin `bin_index` each of `count` examples' t lies in: a permutation keyed on
    (seed, bin)."""
    g = torch.Generator().manual_seed(sample_key(seed, 2**40 + bin_index))
    return torch.randperm(count, generator=g)


def val_draw(seed: int, example: int, bin_index: int, lo: float, hi: float, stratum: int, count: int,
             shape: tuple[int, ...]) -> tuple[float, torch.Tensor]:
    """(t, noise of `shape`) of one (example, bin): t in slice `stratum` of `count` of [lo, hi), at an
    offset drawn, like the noise, from a CPU generator keyed on (seed, example, bin), so the draws are
    the same on any device and world size."""
    g = torch.Generator().manual_seed(sample_key(sample_key(seed, example), bin_index))
    t = lo + (hi - lo) * (stratum + torch.rand((), generator=g, dtype=torch.float64).item()) / count
    return t, torch.randn(shape, generator=g)


class HeldOut:
    """The validation examples, read once: per example its image resized to its bucket (uint8 H × W × 3:
    a quarter of float pixels' memory) and its caption."""

    def __init__(self, cfg, patch: int) -> None:
        v = cfg.val
        d = v.data if v.data is not None else cfg.data
        if v.data is None:
            source, mixer = open_first(cfg)  # the first training source, whose tail the loader leaves out
        else:
            source = open_source(d.source, d.path, image_column=d.image_column,
                                 caption_columns=named_columns(d.captions, d.caption_columns), cache_dir=d.cache_dir,
                                 size=d.image_size, seed=cfg.seed, length=d.length, max_pixels=d.max_pixels,
                                 caption_key="val.data.captions")
            mixer = CaptionMixer(d.captions, cfg.seed)
        if v.data is None:
            if v.num >= len(source):
                raise UserError(f"config key 'val.num'={v.num} holds out the whole training source "
                                f"({len(source)} examples); lower it or give val.data")
            indices = range(len(source) - v.num, len(source))
        else:
            indices = range(min(v.num, len(source)))
        buckets = resolve_buckets(d.buckets, d.image_size, patch)
        self.images: list[np.ndarray] = []
        self.captions: list[str] = []
        self.skipped = 0
        for i in indices:
            try:
                sample = source[i]
                column = mixer.column(sample["captions"], 0, i)
                if column is None:
                    raise SkipSample("no_caption", str(i))
            except SkipSample:
                self.skipped += 1
                continue
            image = sample["image"]
            arr = resize_to_bucket(image, nearest_bucket(image.size[0], image.size[1], buckets))
            self.images.append(arr)
            self.captions.append(sample["captions"][column])
        if not self.images:
            raise UserError(f"no usable validation example among {len(indices)} (val.num, val.data)")

    def __len__(self) -> int:
        return len(self.images)


class ValLoss:
    """A trainer watcher: every `val.every` steps and at the last step, the per-bin validation loss."""

    def __init__(self, cfg, patch: int, log=print) -> None:
        self.cfg, self.every, self.bins = cfg, cfg.val.every, [tuple(b) for b in cfg.val.bins]
        self.examples = HeldOut(cfg, patch)
        self._strata: dict[int, torch.Tensor] = {}
        skipped = f", {self.examples.skipped} unusable skipped" if self.examples.skipped else ""
        log(f"validation: {len(self.examples)} held-out examples{skipped}, bins "
            f"{', '.join(f'[{lo}, {hi})' for lo, hi in self.bins)}, every {self.every} steps")

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and (step % self.every == 0 or step == self.cfg.train.steps)

    def after_step(self, trainer, logger) -> None:
        if self.due(trainer.step):
            with trainer.ema_weights() as parts:
                values = self(parts, trainer.dist, trainer.device)  # under the step's autocast
            logger.log(trainer.step, values)

    def after_final(self, trainer, logger) -> None:
        """Nothing at the end: the last step's validation loss is `after_step`'s (`due` at `train.steps`)."""

    def _draw(self, j: int, b: int, shape: tuple[int, ...]) -> tuple[float, torch.Tensor]:
        n = len(self.examples)
        if b not in self._strata:
            self._strata[b] = strata(self.cfg.val.seed, n, b)
        lo, hi = self.bins[b]
        return val_draw(self.cfg.val.seed, j, b, lo, hi, int(self._strata[b][j]), n, shape)

    def _items(self, dist: Dist) -> list[list[tuple[int, int, float]]]:
        """This rank's forward passes: lists of (example, bin, weight), the same number on every rank.
        Items are grouped by image size (one size per forward) and dealt out in global chunks of
        `train.micro_batch` × world size; a rank left without items runs one padding item of weight 0."""
        mb, world = self.cfg.train.micro_batch, dist.world_size
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, im in enumerate(self.examples.images):
            by_size.setdefault(im.shape, []).append(j)
        passes = []
        for size in sorted(by_size):
            items = [(j, b) for j in by_size[size] for b in range(len(self.bins))]
            for start in range(0, len(items), mb * world):
                mine = items[start + dist.rank * mb: start + (dist.rank + 1) * mb]
                passes.append([(j, b, 1.0) for j, b in mine] or [(*items[0], 0.0)])
        return passes

    @torch.no_grad()
    def __call__(self, parts: Parts, dist: Dist, device: torch.device) -> dict[str, float]:
        """`{"val/loss": mean over bins, "val/loss_<lo>-<hi>": ...}` of the parts as they are (every rank
        calls it; the result is the same on all); their train/eval modes are restored."""
        modules = (parts.transformer, parts.text_encoder, parts.space)
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        hooks = [h for ing in parts.ingredients.values() for h in ing.dense_hooks()]
        sums = torch.zeros(2 * len(self.bins), dtype=torch.float64, device=device)  # loss sums, then counts
        try:
            for items in self._items(dist):
                pixels = uint8_to_pixels(np.stack([self.examples.images[j] for j, _, _ in items])).to(device)
                x0 = parts.space.encode(pixels).float()
                draws = [self._draw(j, b, tuple(x0.shape[1:])) for j, b, _ in items]
                t = torch.tensor([d[0] for d in draws], dtype=torch.float32, device=device)
                noise = torch.stack([d[1] for d in draws]).to(device)
                x_t = parts.denoiser.noisy(x0, noise, t)
                emb, mask = parts.text_encoder.encode([self.examples.captions[j] for j, _, _ in items])
                out = parts.transformer(x_t, t, emb, mask, hooks=hooks)
                per_sample, _ = parts.denoiser.loss(out, x0, x_t, noise, t)
                index = torch.tensor([b for _, b, _ in items], device=device)
                weight = torch.tensor([w for _, _, w in items], dtype=torch.float64, device=device)
                sums.index_add_(0, index, weight * per_sample.double())
                sums.index_add_(0, index + len(self.bins), weight)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        dist.all_reduce_sum(sums)
        per_bin = (sums[: len(self.bins)] / sums[len(self.bins):]).tolist()
        values = {bin_name(lo, hi): v for (lo, hi), v in zip(self.bins, per_bin)}
        return {"val/loss": math.fsum(per_bin) / len(per_bin), **values}

