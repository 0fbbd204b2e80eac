"""The training loop. It knows the recipe only through `Ingredient`s (hooks, extra losses, params).

One step, as data: a global batch of images and captions (this rank's slice, split into micro
batches) → captions dropped for CFG and encoded → images into model space → t and noise drawn,
x_t built (the denoiser, `daybreak.diffusion.objective`) → the transformer predicts x̂0 with the
ingredients' hooks around its blocks → flow loss + the ingredients' losses → backward (accumulated
over micro batches) → clip → optimizer → EMA: `step_once`. The loop (`fit`) reads top to bottom:
data → `step_once` → log → watchers (sample grids, the validation loss, periodic evaluation) →
checkpoint (`Checkpointer`) → stop.

`Trainer(cfg, parts, data, ingredients)` takes its parts ready-made (`daybreak.run.build_trainer`
builds them from a config; the bench passes synthetic text and images), so the step is one piece
of code whoever drives it.

Scale-out: under torchrun the transformer is sharded with FSDP2 (one unit per block), the small
trainable extras are replicated with averaged gradients, and the frozen teachers are replicated.
A step's result does not depend on the world size: the data loader plans global batches of
`train.global_batch` whatever the layout, each micro-batch loss is divided by the number of micro
batches and FSDP averages over ranks, and every per-sample random draw (caption dropout, t, noise)
comes from a generator keyed on (seed, global sample number), not on the rank's own stream.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from daybreak.build import Parts
from daybreak.config import Config
from daybreak.data.buckets import bytes_to_pixels
from daybreak.devices import fast_fp32_matmuls, to_device
from daybreak.errors import UserError
from daybreak.io.store import write_text
from daybreak.optim import optimizers_from_config
from daybreak.recipe import Ingredient, StepTensors
from daybreak.training import fp8, parallel
from daybreak.training.checkpointer import TIME_LIMIT, Checkpointer
from daybreak.training.distributed import Dist, init_distributed
from daybreak.training.ema import EMA
from daybreak.training.logger import RunLogger, plot_losses
from daybreak.training.state import Progress, TrainState


def resolve_precision(cfg: Config, device: torch.device, log=print) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Master weights are fp32 unless train.weights_dtype=bf16
    (the article's ablation), which needs bf16 compute too."""
    p = "bf16" if cfg.train.weights_dtype == "bf16" else cfg.train.precision
    if p == "fp32" or (p == "auto" and device.type == "cpu"):
        return None
    if device.type == "cpu":
        log("warning: train.precision=bf16 on a CPU: without AVX512-BF16/AMX units bf16 matmuls run "
            "50-130x slower than fp32; use train.precision=fp32 here")
    return torch.bfloat16


class PhaseTimer:
    """Wall time of each phase of a step (data, text, forward, backward, optimizer, ema), in ms.

    Set as `Trainer.timer` by `daybreak bench`. It synchronises the device at every phase boundary,
    so that a phase's queued GPU work is charged to it; that costs a little overlap, which is why
    training runs without one (`Trainer.timer = None`: each phase is a shared no-op context).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.ms = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - t0)

    def take(self) -> dict[str, float]:
        """The phases' totals since the last call, and a fresh start."""
        out, self.ms = self.ms, {}
        return out


_UNTIMED = contextlib.nullcontext()


class Watcher(Protocol):
    """Something that looks at the run from the side (sample grids, the validation loss, periodic evaluation)."""

    def after_step(self, trainer: "Trainer", logger: RunLogger) -> None:
        """After each optimizer step, before the step's checkpoint: a run killed here resumes from the
        step before and makes the same again."""

    def after_final(self, trainer: "Trainer", logger: RunLogger | None) -> None:
        """Once `final/` is written; with no logger on a start that finds the run already complete."""


@dataclass
class StepResult:
    """What one `step_once` leaves on the host: `values` {"loss", "grad_norm", each loss term} averaged over
    ranks, `shared` (what rode in the all-reduce) summed over ranks, and whether the step was skipped as
    non-finite (no update)."""

    values: dict[str, float]
    shared: list[float]
    skipped: bool


class Trainer:
    def __init__(self, cfg: Config, parts: Parts, data, ingredients: dict[str, Ingredient], *,
                 watchers: Sequence[Watcher] = (), progress: bool = True, log=print):
        self.cfg, self.log, self.data, self.watchers = cfg, log, data, list(watchers)
        self.dist: Dist = init_distributed(cfg.train.device)
        self.device = self.dist.device
        fast_fp32_matmuls(self.device)
        self.run_dir = Path(cfg.run.dir)
        self.show_progress = progress and self.dist.is_main
        self.autocast_dtype = resolve_precision(cfg, self.device, self._print)
        t = cfg.train
        per_step = t.micro_batch * self.dist.world_size
        if t.global_batch % per_step:
            raise UserError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch × world size "
                            f"= {t.micro_batch} × {self.dist.world_size}")
        self.accum = t.global_batch // per_step

        self.parts = parts
        self.transformer, self.text_encoder, self.space = parts.transformer, parts.text_encoder, parts.space
        self.text_trainable = any(p.requires_grad for p in self.text_encoder.parameters())
        self._null_text: tuple[torch.Tensor, torch.Tensor] | None = None  # "" encoded once, for `_looked_up`
        self.ingredients = nn.ModuleDict(ingredients)
        for m in (self.transformer, self.text_encoder, self.space, self.ingredients):
            m.to(self.device)
        if t.weights_dtype == "bf16":  # the article's ablation: weights and optimizer state stored in bf16
            self.transformer.to(torch.bfloat16)
        self.fp8_gather = False  # FP8 weights all-gathered in float8: their scales are precomputed after each step
        if t.fp8:
            fp8.check_fp8(t.fp8, self.device, t.fp8_emulate)
            fp8.convert_to_fp8(self.transformer, t.fp8, emulate=t.fp8_emulate, sharded=self.dist.enabled)
            self.fp8_gather = fp8.all_gathers_fp8(self.transformer)
        if t.activation_checkpointing:
            parallel.checkpoint_blocks(self.transformer)
        self.compiled = t.compile if t.compile is not None else self.device.type == "cuda"
        if self.compiled:
            parallel.compile_blocks(self.transformer)
        self.replicas = 1  # HSDP replicas: each holds the sharded state once
        if self.dist.enabled:
            whole = (self.text_encoder,) if self.text_trainable else ()
            self.replicas = parallel.replicas(t.replicate, self.dist.world_size)
            parallel.shard_model(self.transformer, whole, param_dtype=self.autocast_dtype,
                                 reduce_dtype=parallel.REDUCE_DTYPES[t.reduce_dtype],
                                 mesh=parallel.hsdp_mesh(self.replicas, self.dist), keep_gathered=t.keep_gathered_blocks)
        # What EMA follows and what the checkpoint calls "the model": the transformer, plus the text
        # tower when it is trained with it (the demo's), plus the trained recipe parts the sampler runs
        # (SPRINT's fusion and mask token: sampling must pair EMA blocks with an EMA fusion).
        self.tracked = nn.ModuleDict({"transformer": self.transformer})
        if self.text_trainable:
            self.tracked["text_encoder"] = self.text_encoder
        at_inference = {n: ing for n, ing in ingredients.items()
                        if ing.at_inference and any(p.requires_grad for p in ing.parameters())}
        if at_inference:
            self.tracked["recipe"] = nn.ModuleDict(at_inference)
        extra = ([self.text_encoder] if self.text_trainable else []) + list(self.ingredients.values())
        self.optim = optimizers_from_config(self.transformer, extra, cfg.optim, log=self._print, steps=t.steps)
        self.replicated = [p for p in self.ingredients.parameters() if p.requires_grad] if self.dist.enabled else []
        self.ema = EMA(self.tracked, cfg.ema)
        self.denoiser = parts.denoiser  # the run's one instance: the sampler and validation get it with `parts`
        self.progress = Progress()
        self.state = TrainState(tracked=self.tracked, recipe=self.ingredients, ema=self.ema, optim=self.optim,
                                data=data, progress=self.progress, dist=self.dist, log=self._print,
                                extra_files=getattr(self.text_encoder, "checkpoint_files", dict)())
        self.checkpointer = Checkpointer(self.state, cfg, self.dist, log=self._print)
        self.params = [p for p in self.state.trainable.parameters() if p.requires_grad]
        self.nonfinite_run = 0  # non-finite steps in a row (the policy stops at `train.max_nonfinite`)
        self.stopped_by = 0  # the signal that stopped `fit` early (run.train exits with 128 + it)
        self.timer: PhaseTimer | None = None  # `daybreak bench`: per-phase times

    # ------------------------------------------------------------------ counters (the `progress` part)
    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def samples_seen(self) -> int:
        return self.progress.samples_seen

    @samples_seen.setter
    def samples_seen(self, value: int) -> None:
        self.progress.samples_seen = value

    @property
    def nonfinite_total(self) -> int:
        return self.progress.nonfinite_total

    # ------------------------------------------------------------------ helpers
    def _print(self, *args) -> None:
        if self.dist.is_main:
            (tqdm.write if self.show_progress else self.log)(" ".join(str(a) for a in args))

    def _phase(self, name: str):
        return _UNTIMED if self.timer is None else self.timer(name)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_batches(self, batch: dict) -> list[dict]:
        """This rank's slice of a global batch as `accum` micro batches; "first" is the global number of a
        micro batch's first sample (the loader gives rank r the r-th slice of the global batch)."""
        first = self.samples_seen + self.dist.rank * self.cfg.train.global_batch // self.dist.world_size
        mb = self.cfg.train.micro_batch
        text = [k for k in ("text_embeds", "text_mask") if k in batch]  # looked up by the loader's workers
        return [{"pixels": batch["pixels"][i: i + mb], "captions": batch["captions"][i: i + mb],
                 "keys": batch["keys"][i: i + mb] if "keys" in batch else None, "first": first + i}
                | {k: batch[k][i: i + mb] for k in text}
                for i in range(0, len(batch["captions"]), mb)]

    # ------------------------------------------------------------------ one micro batch
    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro batch {"pixels", "captions", "first"} and its terms."""
        with self._phase("data"):  # to the device and into model space
            pixels = batch["pixels"].to(self.device, non_blocking=True)  # pinned by the loader on CUDA
            if pixels.dtype == torch.uint8:  # the loader's bytes, converted on the device
                pixels = bytes_to_pixels(pixels)
            x0 = self.space.encode(pixels, keys=batch.get("keys"))
        active = [ing for ing in self.ingredients.values() if ing.active(self.step)]
        hooks = [h for ing in active for h in ing.block_hooks(self.step)]

        def predict(x_t: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            with self._phase("text"), self._autocast():
                if "text_embeds" in batch:
                    emb, mask = self._looked_up(batch, keep)
                else:  # `keep` is drawn on the host: the dropped captions are chosen without a sync
                    captions = [c if k else "" for c, k in zip(batch["captions"], keep.numpy())]
                    emb, mask = self.text_encoder.encode(captions)
            with self._phase("forward"), self._autocast():
                return self.transformer(x_t, t, emb, mask, hooks=hooks)

        d = self.denoiser(x0, batch["first"], predict)
        terms = {"flow": d.loss.mean()}
        if active:
            with self._phase("forward"):
                s = StepTensors(x0=x0, pixels=pixels, x_t=d.x_t, t=d.t, noise=d.noise, x0_hat=d.x0_hat,
                                grid=self.parts.token_grid(*pixels.shape[-2:]), step=self.step)
                with self._autocast():
                    for ing in active:
                        terms.update({k: v.float() for k, v in ing.losses(s).items()})
        return sum(terms.values()), terms

    def _looked_up(self, batch: dict, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption embeddings the loader's workers read from the text cache (pinned, copied
        non-blocking), the null caption's where `keep` drops a caption: what `encode` gives."""
        if self._null_text is None:
            self._null_text = self.text_encoder.encode([""])
        null_emb, null_mask = self._null_text
        keep = to_device(keep, self.device)
        emb = batch["text_embeds"].to(self.device, non_blocking=True)
        mask = batch["text_mask"].to(self.device, non_blocking=True)
        return torch.where(keep[:, None, None], emb, null_emb), torch.where(keep[:, None], mask, null_mask)

    # ------------------------------------------------------------------ one optimizer step
    def step_once(self, batch: dict, share: Sequence[float] = ()) -> StepResult:
        """One optimizer step on this rank's slice of a global batch (what the loader gives), with its
        bookkeeping: `samples_seen` moves on by the global batch (it keys the per-sample draws, so a
        skipped step's samples are not drawn again), `step` by one unless the step was non-finite, and
        the non-finite counters. `share`: host scalars to sum over ranks in the step's all-reduce
        (the loop's stop and checkpoint flags), returned as `StepResult.shared`."""
        self.optim.zero_grad()
        totals: dict[str, torch.Tensor] = {}
        for micro in self.micro_batches(batch):
            loss, terms = self.forward_loss(micro)
            with self._phase("backward"):
                (loss / self.accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0) + v.detach() / self.accum
        with self._phase("optimizer"):
            parallel.sync_replicated_grads(self.replicated, self.dist)
            norm, values, shared = self._reduce_scalars(totals, share)
            finite = math.isfinite(values["grad_norm"]) and math.isfinite(values["loss"])
            if finite:
                self._clip_and_step(norm)
            else:
                self.optim.zero_grad()
        if finite:
            with self._phase("ema"):
                self.ema.update(self.tracked, self.step)
            self.step += 1
            self.nonfinite_run = 0
        else:
            self.progress.nonfinite_total += 1
            self.nonfinite_run += 1
        self.samples_seen += self.cfg.train.global_batch
        return StepResult(values, shared, skipped=not finite)

    def _grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's gradients: the shards of the FSDP-sharded weights, and the whole (replicated) ones."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return [parallel.local(g) for g in grads if hasattr(g, "to_local")], [g for g in grads if not hasattr(g, "to_local")]

    def _reduce_scalars(self, totals: dict[str, torch.Tensor], share: Sequence[float]
                        ) -> tuple[torch.Tensor, dict[str, float], list[float]]:
        """The step's one all-reduce and its one readback, the step's only host-device sync: the sharded
        weights' squared gradient norm, the loss terms and `share`, packed in one tensor, so that every
        rank takes the same decisions. Returns the gradient norm (on the device, for clipping), the host
        values {"grad_norm", "loss", term...} (averaged over ranks) and `share` summed over ranks."""
        sharded, plain = self._grads()

        def sq(gs):
            return torch.stack(torch._foreach_norm(gs)).float().square().sum() if gs else torch.zeros((), device=self.device)

        keys = sorted(totals)
        riders = to_device(torch.tensor([float(f) for f in share], dtype=torch.float32), self.device)
        packed = torch.cat([torch.stack([sq(sharded) / self.replicas, *[totals[k].float() for k in keys]]), riders])
        self.dist.all_reduce_sum(packed)  # plain grads are identical on every rank: added after
        norm = (packed[0] + sq(plain)).sqrt()
        terms = [v / self.dist.world_size for v in packed[1: 1 + len(keys)]]
        host = torch.stack([norm, sum(terms), *terms, *packed[1 + len(keys):]]).tolist()  # the one sync
        values = {"grad_norm": host[0], "loss": host[1], **dict(zip(keys, host[2: 2 + len(keys)]))}
        return norm, values, host[2 + len(keys):]

    def _clip_and_step(self, norm: torch.Tensor) -> None:
        """Clip to `optim.grad_clip` by the global norm, then the optimizers (and FP8's scales)."""
        sharded, plain = self._grads()
        coef = (self.cfg.optim.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(sharded + plain, coef)
        self.optim.step()
        if self.fp8_gather:
            fp8.precompute_scales(self.transformer)

    def load(self, ckpt: Path) -> None:
        """Restore a sharded step checkpoint (any world size's) into this trainer."""
        self.state.load(ckpt)

    # ------------------------------------------------------------------ the EMA model, for sampling and eval
    @contextlib.contextmanager
    def ema_weights(self):
        """The model parts with the EMA weights swapped in (every rank: FSDP needs all), restored after.
        Used under the training step's autocast: FSDP gathers the weights in its compute dtype (bf16)
        and keeps the inputs' dtype, so every forward on them (grids, eval, the validation loss) must
        let autocast cast the matmul inputs, as the step does."""
        try:
            with self.ema.swapped_in(self.tracked), self._autocast():
                yield Parts(self.transformer, self.text_encoder, self.space, dict(self.ingredients),
                            denoiser=self.denoiser)
        finally:
            self.transformer.train()
            self.text_encoder.train(self.text_trainable)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        """Train to `train.steps` (resuming from the run directory's newest checkpoint); returns `final/`,
        or the step checkpoint written when a signal stopped the run."""
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            write_text(self.run_dir / "config.yaml", cfg.to_yaml())  # atomic: a kill never leaves half of it
        self.checkpointer.resume_or_init()
        if self.checkpointer.complete():
            for w in self.watchers:  # a run killed after final/ and before its watchers were done
                w.after_final(self, None)
            self._print(f"run already complete at step {self.step}: {self.checkpointer.final}")
            return self.checkpointer.final
        lc = cfg.log
        wandb = (dict(project=lc.project, name=lc.name or cfg.run.name, group=lc.group, entity=lc.entity,
                      config=cfg.to_dict()) if lc.wandb else None)
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main, wandb=wandb)
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.show_progress, dynamic_ncols=True,
                   desc=cfg.run.name)
        try:
            with self.checkpointer.watching():
                stopped = self._loop(logger, bar)
                if stopped is not None:
                    return stopped
                final = self.checkpointer.consolidate()
                for w in self.watchers:
                    w.after_final(self, logger)
            if self.dist.is_main:
                plot_losses(self.run_dir)
            return final
        finally:
            bar.close()
            logger.close()

    def _loop(self, logger: RunLogger, bar) -> Path | None:
        """Steps until `train.steps`, the time limit or a signal; returns the checkpoint a signal left."""
        self.transformer.train()
        self.text_encoder.train(self.text_trainable)
        data, window = iter(self.data), _Window()
        while self.step < self.cfg.train.steps:
            with self._phase("data"):
                batch = next(data)
            result = self.step_once(batch, share=self.checkpointer.flags())
            stop = self.checkpointer.agree(result.shared)
            if result.skipped:
                self._skipped(bar)
            else:
                self._log_step(logger, bar, window, result.values)
                for w in self.watchers:
                    w.after_step(self, logger)
                self.checkpointer.at_step(self.step)
            if stop is not None:
                return self._stop(stop)
        return None

    def _skipped(self, bar) -> None:
        """The non-finite policy: a skipped step is counted; `train.max_nonfinite` in a row stop the run,
        the last good state saved."""
        bar.set_postfix_str(f"skipped non-finite steps {self.nonfinite_total}")
        if self.nonfinite_run >= self.cfg.train.max_nonfinite:
            path = self.checkpointer.save(self.step)
            raise UserError(f"{self.nonfinite_run} non-finite steps in a row at step {self.step}; "
                            f"stopped, last good state saved in {path}")

    def _log_step(self, logger: RunLogger, bar, window: "_Window", host: dict[str, float]) -> None:
        t = self.cfg.train
        window.add(host["loss"], t.global_batch)
        if self.step % t.log_every == 0 or self.step == t.steps:
            values = {k if k in ("loss", "grad_norm") else f"loss/{k}": v for k, v in host.items()}
            values["loss"] = sum(window.losses) / len(window.losses)
            values.update({"images_per_s": window.images_per_s(), "lr": self.optim.lrs()["adamw"],
                           **{f"lr/{k}": v for k, v in self.optim.lrs().items()},
                           "skipped_nonfinite": self.nonfinite_total, **self.data.stats(),
                           "captions_truncated": getattr(self.text_encoder, "truncated", 0)})
            logger.log(self.step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}",
                            skipped=self.nonfinite_total)
            window.reset()
        bar.update(1)

    def _stop(self, reason: str) -> Path | None:
        """A stop every rank agreed on: this step's checkpoint, then out of the loop (a signal ends the
        run there; the time limit goes on to `final/`)."""
        path = self.checkpointer.save_to_stop(self.step)
        if reason == TIME_LIMIT:
            self._print(f"time limit of {self.cfg.train.time_limit_minutes} min reached at step {self.step}")
            return None
        self.stopped_by = signal.Signals[reason]
        self._print(f"stop signal: checkpoint at step {self.step} in {path}; exiting")
        return path


class _Window:
    """Losses and throughput since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.images, self.t0 = 0, time.perf_counter()

    def add(self, loss: float, images: int) -> None:
        self.losses.append(loss)
        self.images += images

    def images_per_s(self) -> float:
        return self.images / (time.perf_counter() - self.t0)
