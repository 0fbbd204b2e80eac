"""The training loop. It knows the recipe only through `Ingredient`s (hooks, extra losses, params).

One step, as data: a global batch of images and captions (this rank's slice, split into micro
batches) → captions dropped for CFG and encoded → images into model space → t and noise drawn,
x_t built → the transformer predicts x̂0 with the ingredients' hooks around its blocks → flow loss +
the ingredients' losses → backward (accumulated over micro batches) → clip → optimizer → EMA.
Logging, checkpoints and sample grids watch from the side.

Scale-out: under torchrun the transformer is sharded with FSDP2 (one unit per block), the small
trainable extras are replicated with averaged gradients, and the frozen teachers are replicated.
A step's result does not depend on the world size: the data loader plans global batches of
`train.global_batch` whatever the layout, each micro-batch loss is divided by the number of micro
batches and FSDP averages over ranks, and every per-sample random draw (caption dropout, t, noise)
comes from a generator keyed on (seed, global sample number), not on the rank's own stream.
Drawing the global batch's noise on every rank and slicing would also be layout-free, but costs
each rank the whole batch's noise (gigabytes per step at 1024 px × 1024 images).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from daybreak.config import Config
from daybreak.data import build_data
from daybreak.errors import UserError
from daybreak.evaluate.periodic import PeriodicEval
from daybreak.flow import FlowObjective, caption_keep_mask, noisy, sample_timesteps
from daybreak.images import image_grid
from daybreak.optim import build_optimizer
from daybreak.pipeline import Parts, Pipeline, build_parts
from daybreak.recipe import StepTensors, build_ingredients
from daybreak.recipe.ema import EMA
from daybreak.train import checkpoint as ck
from daybreak.train import parallel
from daybreak.train.distributed import Dist, init_distributed, rng_state, set_rng_state, shutdown
from daybreak.train.logger import RunLogger, plot_losses


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


def sample_key(seed: int, number: int) -> int:
    """A 63-bit generator seed for global sample `number` of run `seed` (mixed, so neighbours differ)."""
    return ((seed + 1) * 0x9E3779B97F4A7C15 + number * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def per_sample_draws(cfg: Config, numbers: range, shape: tuple[int, ...], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep caption (B,), t (B,), noise (B, *shape)) for the global samples `numbers`, each from its own generator."""
    o = cfg.objective
    keep, ts, noise = [], [], []
    for n in numbers:
        g = torch.Generator(device=device).manual_seed(sample_key(cfg.seed, n))
        keep.append(caption_keep_mask(1, o.caption_dropout, g))
        ts.append(sample_timesteps(1, generator=g, shift=o.shift, uniform_prob=o.uniform_prob, mean=o.logit_mean,
                                   std=o.logit_std))
        noise.append(torch.randn(shape, generator=g, device=device))
    return torch.cat(keep), torch.cat(ts), torch.stack(noise)


class Trainer:
    def __init__(self, cfg: Config, *, progress: bool = True, log=print):
        self.cfg = cfg
        self.log = log
        self.dist: Dist = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.run.dir)
        self.progress = progress and self.dist.is_main
        self.autocast_dtype = resolve_precision(cfg, self.device, self._print)
        t = cfg.train
        per_step = t.micro_batch * self.dist.world_size
        if t.global_batch % per_step:
            raise UserError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch × world size "
                            f"= {t.micro_batch} × {self.dist.world_size}")
        self.accum = t.global_batch // per_step

        torch.manual_seed(cfg.seed)
        parts = build_parts(cfg)
        self.transformer, self.text_encoder, self.space = parts.transformer, parts.text_encoder, parts.space
        self.text_trainable = any(p.requires_grad for p in self.text_encoder.parameters())
        self.ingredients = nn.ModuleList(build_ingredients(cfg, self.transformer))
        for m in (self.transformer, self.text_encoder, self.space, self.ingredients):
            m.to(self.device)
        if t.weights_dtype == "bf16":  # the article's ablation: weights and optimizer state stored in bf16
            self.transformer.to(torch.bfloat16)
        if t.activation_checkpointing:
            parallel.checkpoint_blocks(self.transformer)
        if t.compile:
            parallel.compile_blocks(self.transformer)
        if self.dist.enabled:
            whole = (self.text_encoder,) if self.text_trainable else ()
            parallel.shard_model(self.transformer, whole, param_dtype=self.autocast_dtype)
        # What EMA follows and what the checkpoint calls "the model": the transformer, plus the text
        # tower when it is trained with it (the demo's).
        self.tracked = nn.ModuleDict({"transformer": self.transformer})
        if self.text_trainable:
            self.tracked["text_encoder"] = self.text_encoder
        # Everything the optimizer trains, under the names sharded checkpoints use.
        self.trainable = nn.ModuleDict({**self.tracked, "recipe": self.ingredients})
        extra = ([self.text_encoder] if self.text_trainable else []) + list(self.ingredients)
        self.optim = build_optimizer(
            self.transformer, extra, name=cfg.optim.name, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
            muon_momentum=cfg.optim.muon_momentum, muon_nesterov=cfg.optim.muon_nesterov,
            muon_ns_steps=cfg.optim.muon_ns_steps, muon_lr=cfg.optim.muon_lr, log=self._print)
        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.replicated = [p for p in self.ingredients.parameters() if p.requires_grad] if self.dist.enabled else []
        for opt in self.optim.optimizers.values():
            parallel.unmix_foreach(opt)
        self.ema = EMA(self.tracked, decay=cfg.ema.decay, every=cfg.ema.every, start=cfg.ema.start)
        self.objective = FlowObjective(prediction=cfg.objective.prediction, t_clamp=cfg.objective.t_clamp)
        self.periodic = PeriodicEval(cfg, self.device)  # built now: a missing metric weight fails before step 1
        self.data = build_data(cfg, rank=self.dist.rank, world_size=self.dist.world_size,
                               batch_size=t.global_batch // self.dist.world_size, patch=self.pixel_patch,
                               log=self._print)
        self.step = 0
        self.samples_seen = 0  # global samples consumed, skipped steps included: keys the per-sample draws
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self._stop_signal = 0
        self._pending: ck.ShardedSave | None = None

    # ------------------------------------------------------------------ helpers
    def _print(self, *args) -> None:
        if self.dist.is_main:
            (tqdm.write if self.progress else self.log)(" ".join(str(a) for a in args))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def pixel_patch(self) -> int:
        return self.transformer.patch_size * self.space.downscale

    def micro_batches(self, batch: dict) -> list[dict]:
        """This rank's slice of a global batch as `accum` micro batches; "first" is the global number of a
        micro batch's first sample (the loader gives rank r the r-th slice of the global batch)."""
        first = self.samples_seen + self.dist.rank * self.cfg.train.global_batch // self.dist.world_size
        mb = self.cfg.train.micro_batch
        return [{"pixels": batch["pixels"][i: i + mb], "captions": batch["captions"][i: i + mb],
                 "keys": batch["keys"][i: i + mb], "first": first + i}
                for i in range(0, len(batch["captions"]), mb)]

    # ------------------------------------------------------------------ one micro batch
    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro batch {"pixels", "captions", "first"} and its terms."""
        cfg = self.cfg
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        x0 = self.space.encode(pixels, keys=batch.get("keys"))
        numbers = range(batch["first"], batch["first"] + x0.shape[0])
        keep, t, noise = per_sample_draws(cfg, numbers, tuple(x0.shape[1:]), self.device)
        captions = [c if k else "" for c, k in zip(batch["captions"], keep.tolist())]
        x_t = noisy(x0, noise, t)
        active = [ing for ing in self.ingredients if ing.active(self.step)]
        hooks = [h for ing in active for h in ing.block_hooks(self.step)]
        with self._autocast():
            emb, mask = self.text_encoder.encode(captions)
            out = self.transformer(x_t, t, emb, mask, hooks=hooks)
        per_sample, x0_hat = self.objective.loss(out.float(), x0, x_t, noise, t)
        terms = {"flow": per_sample.mean()}
        if active:
            pixels_hat = x0_hat if self.space.downscale == 1 else None
            s = StepTensors(x0=x0, pixels=pixels, x_t=x_t, t=t, noise=noise, x0_hat=x0_hat, pixels_hat=pixels_hat,
                            patch_size=self.transformer.patch_size, pixel_patch=self.pixel_patch, step=self.step)
            with self._autocast():
                for ing in active:
                    terms.update({k: v.float() for k, v in ing.losses(s).items()})
        return sum(terms.values()), terms

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batches: list[dict], flags: tuple[float, ...] = ()
                   ) -> tuple[dict[str, torch.Tensor] | None, list[float]]:
        """One optimizer step on this rank's micro batches (see `micro_batches`).

        Returns the step's loss terms averaged over ranks (None when the step was skipped as
        non-finite) and `flags` summed over ranks. One all-reduce carries the gradient norm of
        the sharded weights, the loss terms and the flags, so every rank takes the same decisions.
        """
        self.optim.zero_grad()
        totals: dict[str, torch.Tensor] = {}
        for batch in batches:
            loss, terms = self.forward_loss(batch)
            (loss / self.accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0) + v.detach() / self.accum
        parallel.sync_replicated_grads(self.replicated, self.dist)
        grads = [p.grad for p in self.params if p.grad is not None]
        sharded = [parallel.local(g) for g in grads if hasattr(g, "to_local")]
        plain = [g for g in grads if not hasattr(g, "to_local")]

        def sq(gs):
            return torch.stack(torch._foreach_norm(gs)).float().square().sum() if gs else torch.zeros((), device=self.device)

        keys = sorted(totals)
        packed = torch.stack([sq(sharded), *[totals[k].float() for k in keys],
                              *[torch.tensor(float(f), device=self.device) for f in flags]])
        self.dist.all_reduce_sum(packed)  # plain grads are identical on every rank: added after
        norm = (packed[0] + sq(plain)).sqrt()
        terms = {k: v / self.dist.world_size for k, v in zip(keys, packed[1: 1 + len(keys)])}
        reduced_flags = packed[1 + len(keys):].tolist()  # the step's one host sync
        loss_total = sum(terms.values())
        if not (math.isfinite(norm.item()) and math.isfinite(loss_total.item())):
            self.optim.zero_grad()
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            return None, reduced_flags
        self.nonfinite_run = 0
        coef = (self.cfg.optim.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(sharded + plain, coef)
        self.optim.step()
        self.ema.update(self.tracked, self.step)
        return {**terms, "grad_norm": norm, "loss": loss_total}, reduced_flags

    # ------------------------------------------------------------------ checkpoints
    def _optimizers(self) -> list:
        return list(self.optim.optimizers.values())

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.trainable), "ema": dict(self.ema.shadow),
                "optim": get_optimizer_state_dict(self.trainable, self._optimizers())}

    def _trainer_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "nonfinite_total": self.nonfinite_total,
                "schedulers": {n: s.state_dict() for n, s in self.optim.schedulers.items()},
                "ema": {k: v for k, v in self.ema.state_dict().items() if k != "shadow"},
                "data": self.data.state_dict(), "world_size": self.dist.world_size}

    def save(self, dest: Path, async_save: bool = False) -> Path:
        """A sharded step checkpoint of the whole training state (every rank takes part)."""
        self.wait_for_save()
        meta = {"step": self.step, "run": self.cfg.run.name, "layout": "sharded", "world_size": self.dist.world_size}
        files = {"config.yaml": self.cfg.to_yaml(), "trainer.pt": self._trainer_state()}
        self._pending = ck.ShardedSave(dest, self._sharded_state(), files, rng_state(), meta, self.dist, async_save)
        if self._pending.published:
            self._after_publish()
        return Path(dest)

    def _after_publish(self) -> None:
        self._pending = None
        if self.dist.is_main:
            ck.prune(self.run_dir, self.cfg.train.keep_checkpoints)

    def wait_for_save(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._after_publish()

    def save_consolidated(self, dest: Path) -> Path:
        """Full weights (raw, EMA, recipe) gathered on rank 0 in the single-file layout (`final/`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.trainable, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in self.ema.shadow.items()}
        if self.dist.is_main:
            files = {"config.yaml": self.cfg.to_yaml()}
            for name, prefix in ck.SHARDED_PREFIX.items():
                source, prefix = (ema, prefix[len("ema."):]) if prefix.startswith("ema.") else (full, prefix[len("model."):])
                part = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
                if part:
                    files[name] = part
            ck.write_checkpoint(dest, files, {"step": self.step, "run": self.cfg.run.name, "layout": "consolidated"})
        self.dist.barrier()
        return Path(dest)

    def load(self, ckpt: Path) -> None:
        """Restore a sharded step checkpoint, written by any world size, onto this one."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not ck.is_sharded(ckpt):
            raise UserError(f"'{ckpt}' is not a resumable step checkpoint (no DCP .metadata)")
        state = self._sharded_state()
        ck.dcp_load(state, ckpt, self.dist, "cannot resume")
        set_model_state_dict(self.trainable, state["model"])
        set_optimizer_state_dict(self.trainable, self._optimizers(), state["optim"])
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        for name, sched in self.optim.schedulers.items():
            sched.load_state_dict(trainer["schedulers"][name])
        self.ema.decay, self.ema.every, self.ema.start = (trainer["ema"][k] for k in ("decay", "every", "start"))
        self.data.load_state_dict(trainer["data"])
        rng = ckpt / "rng" / f"rank_{self.dist.rank:05d}.pt"
        if rng.is_file():  # a rank beyond the saving run's world size keeps its fresh generators
            set_rng_state(rng.read_bytes())
        self.step, self.samples_seen = trainer["step"], trainer["samples_seen"]
        self.nonfinite_total = trainer["nonfinite_total"]

    # ------------------------------------------------------------------ sampling for the run's eyes
    @contextlib.contextmanager
    def ema_weights(self):
        """The model parts with the EMA weights swapped in (every rank: FSDP needs all), restored after."""
        live = [parallel.local(t).detach().clone() for t in self._tracked_tensors()]
        self.ema.copy_to(self.tracked)
        try:
            yield Parts(self.transformer, self.text_encoder, self.space, list(self.ingredients))
        finally:
            parallel.reshard(self.tracked)
            with torch.no_grad():
                for t, saved in zip(self._tracked_tensors(), live):
                    parallel.local(t).copy_(saved)
            self.transformer.train()
            self.text_encoder.train(self.text_trainable)

    def sample_grid(self, name: str) -> Path | None:
        """A grid of the EMA model's samples of `sample.prompts`; every rank samples, rank 0 writes."""
        prompts = self.cfg.sample.prompts
        if not prompts:
            return None
        with self.ema_weights() as parts:
            images = Pipeline(parts, self.cfg, self.device)(prompts, seed=self.cfg.sample.seed)
        if not self.dist.is_main:
            return None
        out = self.run_dir / "samples" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, captions=prompts).save(out)
        return out

    def periodic_eval(self, logger: RunLogger) -> None:
        """`eval.metrics` of the EMA model every `eval.every` steps, logged as eval/<metric>."""
        if not self.periodic.due(self.step):
            return
        with self.ema_weights() as parts:
            values = self.periodic(parts)
        logger.log(self.step, values)

    def _tracked_tensors(self) -> list[torch.Tensor]:
        return [*self.tracked.parameters(), *self.tracked.buffers()]

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _resume_or_init(self) -> None:
        latest = ck.latest_checkpoint(self.run_dir)
        if latest is not None:
            self.load(latest)
            self._print(f"resumed from step {self.step}")
        elif self.cfg.init_from:
            from daybreak.train.stages import init_weights

            init_weights(self, self.cfg.init_from, optimizer=self.cfg.init_optimizer)

    def fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self._resume_or_init()
        final = self.run_dir / "final"
        if self.step >= t.steps and ck.checkpoint_step(final) == self.step:
            self._print(f"run already complete at step {self.step}: {final}")
            return final
        async_save = t.async_checkpoint
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc=cfg.run.name)
        self.transformer.train()
        self.text_encoder.train(self.text_trainable)
        data_iter = iter(self.data)
        t0, seen, window_loss = time.perf_counter(), 0, []
        deadline = time.monotonic() + 60 * t.time_limit_minutes if t.time_limit_minutes > 0 else math.inf
        ckdir = self.run_dir / "checkpoints"
        try:
            while self.step < t.steps:
                batches = self.micro_batches(next(data_iter))
                terms, (signalled, late) = self.train_step(batches, (self._stop_signal > 0, time.monotonic() > deadline))
                self.samples_seen += t.global_batch
                if self._pending is not None and self._pending.poll():
                    self._after_publish()
                if terms is None:
                    bar.set_postfix_str(f"skipped non-finite steps {self.nonfinite_total}")
                    if self.nonfinite_run >= t.max_nonfinite:
                        path = self.save(ckdir / ck.step_dir_name(self.step))
                        raise UserError(f"{self.nonfinite_run} non-finite steps in a row at step {self.step}; "
                                        f"stopped, last good state saved in {path}")
                else:
                    self.step += 1
                    seen += t.global_batch
                    window_loss.append(terms["loss"])
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        values = {k if k in ("loss", "grad_norm") else f"loss/{k}": v.item() for k, v in terms.items()}
                        values["loss"] = torch.stack(window_loss).mean().item()
                        elapsed = time.perf_counter() - t0
                        values.update({"images_per_s": seen / elapsed, "lr": self.optim.lrs()["adamw"],
                                       "skipped_nonfinite": self.nonfinite_total, **self.data.stats(),
                                       "captions_truncated": getattr(self.text_encoder, "truncated", 0)})
                        logger.log(self.step, values)
                        bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}",
                                        skipped=self.nonfinite_total)
                        t0, seen, window_loss = time.perf_counter(), 0, []
                    bar.update(1)
                    if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        self.save(ckdir / ck.step_dir_name(self.step), async_save=async_save and self.step < t.steps)
                    if t.sample_every and self.step % t.sample_every == 0:
                        self.sample_grid(ck.step_dir_name(self.step))
                    self.periodic_eval(logger)
                if signalled or late:
                    path = ckdir / ck.step_dir_name(self.step)
                    if not (path / "meta.json").is_file():
                        self.save(path)
                    self.wait_for_save()
                    if signalled:
                        self._print(f"stop signal: checkpoint at step {self.step} in {path}; exiting")
                        return path
                    self._print(f"time limit of {t.time_limit_minutes} min reached at step {self.step}")
                    break
            self.wait_for_save()
            self.save_consolidated(final)
            self.sample_grid("final")
            if self.dist.is_main:
                plot_losses(self.run_dir)
            return final
        finally:
            bar.close()
            logger.close()
            for s, h in handlers.items():
                signal.signal(s, h)


def train(cfg: Config, *, progress: bool = True) -> Path:
    """Train `cfg` (resuming from its run directory's newest checkpoint); returns the final checkpoint
    (or the step checkpoint written when a signal stopped the run)."""
    try:
        return Trainer(cfg, progress=progress).fit()
    finally:
        shutdown()
