"""The training loop. It knows the recipe only through `Ingredient`s (hooks, extra losses, params).

One step, as data: a batch of images and captions → captions dropped for CFG and encoded → images
into model space → t and noise drawn, x_t built → the transformer predicts x̂0 with the ingredients'
hooks around its blocks → flow loss + the ingredients' losses → backward (accumulated over micro
batches) → clip → optimizer → EMA. Logging, checkpoints and sample grids watch from the side.
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
from daybreak.flow import FlowObjective, caption_keep_mask, noisy, sample_timesteps
from daybreak.optim import build_optimizer, clip_grad_norm
from daybreak.images import image_grid
from daybreak.pipeline import Pipeline, build_parts
from daybreak.recipe import StepTensors, build_ingredients
from daybreak.recipe.ema import EMA
from daybreak.train import checkpoint as ck
from daybreak.train.distributed import Dist, init_distributed
from daybreak.train.logger import RunLogger, plot_losses


def resolve_precision(cfg: Config, device: torch.device, log=print) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Master weights are always fp32."""
    p = cfg.train.precision
    if p == "fp32" or (p == "auto" and device.type == "cpu"):
        return None
    if device.type == "cpu":
        log("warning: train.precision=bf16 on a CPU: without AVX512-BF16/AMX units bf16 matmuls run "
            "50-130x slower than fp32; use train.precision=fp32 here")
    return torch.bfloat16


class Trainer:
    def __init__(self, cfg: Config, *, progress: bool = True, log=print):
        self.cfg = cfg
        self.log = log
        self.dist: Dist = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.run.dir)
        self.autocast_dtype = resolve_precision(cfg, self.device, self._print)
        t = cfg.train
        per_step = t.micro_batch * self.dist.world_size
        if t.global_batch % per_step:
            raise UserError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch × world size "
                            f"= {t.micro_batch} × {self.dist.world_size}")
        self.accum = t.global_batch // per_step
        self.progress = progress and self.dist.is_main

        torch.manual_seed(cfg.seed)
        parts = build_parts(cfg)
        self.transformer, self.text_encoder, self.space = parts.transformer, parts.text_encoder, parts.space
        self.text_trainable = any(p.requires_grad for p in self.text_encoder.parameters())
        self.ingredients = nn.ModuleList(build_ingredients(cfg, self.transformer))
        for m in (self.transformer, self.text_encoder, self.space, self.ingredients):
            m.to(self.device)
        # What EMA follows and what the checkpoint calls "the model": the transformer, plus the text
        # tower when it is trained with it (the demo's).
        self.tracked = nn.ModuleDict({"transformer": self.transformer})
        if self.text_trainable:
            self.tracked["text_encoder"] = self.text_encoder
        extra = ([self.text_encoder] if self.text_trainable else []) + list(self.ingredients)
        self.optim = build_optimizer(
            self.transformer, extra, name=cfg.optim.name, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
            muon_momentum=cfg.optim.muon_momentum, muon_nesterov=cfg.optim.muon_nesterov,
            muon_ns_steps=cfg.optim.muon_ns_steps, muon_lr=cfg.optim.muon_lr, log=self._print)
        self.params = [p for m in (self.tracked, self.ingredients) for p in m.parameters() if p.requires_grad]
        self.ema = EMA(self.tracked, decay=cfg.ema.decay, every=cfg.ema.every, start=cfg.ema.start)
        self.objective = FlowObjective(prediction=cfg.objective.prediction, t_clamp=cfg.objective.t_clamp)
        self.data = build_data(cfg, rank=self.dist.rank, world_size=self.dist.world_size,
                               batch_size=t.micro_batch, log=self._print)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self._stop_signal: int | None = None

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

    # ------------------------------------------------------------------ one micro batch
    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        x0 = self.space.encode(pixels)
        b = x0.shape[0]
        keep = caption_keep_mask(b, cfg.objective.caption_dropout, self.gen, self.device)
        captions = [c if k else "" for c, k in zip(batch["captions"], keep.tolist())]
        t = sample_timesteps(b, generator=self.gen, shift=cfg.objective.shift, uniform_prob=cfg.objective.uniform_prob,
                             mean=cfg.objective.logit_mean, std=cfg.objective.logit_std, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
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
    def train_step(self, batches: list[dict]) -> dict[str, torch.Tensor] | None:
        """Returns the step's loss terms (detached tensors), or None when the step was skipped."""
        self.optim.zero_grad()
        totals: dict[str, torch.Tensor] = {}
        for batch in batches:
            loss, terms = self.forward_loss(batch)
            (loss / self.accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0) + v.detach() / self.accum
        norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        totals["grad_norm"] = norm
        loss_total = sum(v for k, v in totals.items() if k != "grad_norm")
        if not (torch.isfinite(norm) and torch.isfinite(loss_total)):  # one host sync per step, on purpose
            self.optim.zero_grad()
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            return None
        self.nonfinite_run = 0
        self.optim.step()
        self.ema.update(self.tracked, self.step)
        totals["loss"] = loss_total
        return totals

    # ------------------------------------------------------------------ checkpoints
    def state_files(self) -> dict:
        ema_sd = self.ema.state_dict()
        shadow = ema_sd["shadow"]
        files = {
            "config.yaml": self.cfg.to_yaml(),
            "transformer.safetensors": self.transformer.state_dict(),
            "transformer_ema.safetensors": {k[len("transformer."):]: v for k, v in shadow.items()
                                            if k.startswith("transformer.")},
            "trainer.pt": {
                "step": self.step,
                "optim": self.optim.state_dict(),
                "ema": {k: v for k, v in ema_sd.items() if k != "shadow"},
                "rng": {"torch": torch.get_rng_state(), "gen": self.gen.get_state()},
                "data": self.data.state_dict(),
                "nonfinite_total": self.nonfinite_total,
            },
        }
        if self.text_trainable:
            files["text_encoder.safetensors"] = self.text_encoder.state_dict()
            files["text_encoder_ema.safetensors"] = {k[len("text_encoder."):]: v for k, v in shadow.items()
                                                     if k.startswith("text_encoder.")}
        recipe = self.ingredients.state_dict()
        if recipe:
            files["recipe.safetensors"] = recipe
        return files

    def save(self, dest: Path) -> Path:
        path = ck.write_checkpoint(dest, self.state_files(), {"step": self.step, "run": self.cfg.run.name})
        return path

    def load(self, ckpt: Path) -> None:
        self.transformer.load_state_dict(ck.load_tensors(ckpt, "transformer.safetensors"))
        shadow = {f"transformer.{k}": v for k, v in ck.load_tensors(ckpt, "transformer_ema.safetensors").items()}
        if self.text_trainable:
            self.text_encoder.load_state_dict(ck.load_tensors(ckpt, "text_encoder.safetensors"))
            shadow.update({f"text_encoder.{k}": v
                           for k, v in ck.load_tensors(ckpt, "text_encoder_ema.safetensors").items()})
        if (ckpt / "recipe.safetensors").is_file():
            self.ingredients.load_state_dict(ck.load_tensors(ckpt, "recipe.safetensors"))
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        self.ema.load_state_dict({**state["ema"], "shadow": shadow})
        self.optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"]["torch"])
        self.gen.set_state(state["rng"]["gen"])
        self.data.load_state_dict(state["data"])
        self.nonfinite_total = state["nonfinite_total"]
        self.step = state["step"]

    # ------------------------------------------------------------------ sampling for the run's eyes
    def sample_grid(self, name: str) -> Path | None:
        prompts = self.cfg.sample.prompts
        if not prompts or not self.dist.is_main:
            return None
        backup = {k: v.detach().clone() for k, v in self.tracked.state_dict().items()}
        self.ema.copy_to(self.tracked)
        try:
            pipe = Pipeline(self._parts(), self.cfg, self.device)
            images = pipe(prompts, seed=self.cfg.sample.seed)
        finally:
            self.tracked.load_state_dict(backup)
            self.transformer.train()
            self.text_encoder.train(self.text_trainable)
        out = self.run_dir / "samples" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, captions=prompts).save(out)
        return out

    def _parts(self):
        from daybreak.pipeline import Parts

        return Parts(self.transformer, self.text_encoder, self.space)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        latest = ck.latest_checkpoint(self.run_dir)
        if latest is not None:
            self.load(latest)
            self._print(f"resumed from step {self.step}")
        elif cfg.init_from:
            from daybreak.train.stages import init_weights

            init_weights(self, cfg.init_from)
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc=cfg.run.name)
        self.transformer.train()
        self.text_encoder.train(self.text_trainable)
        data_iter = iter(self.data)
        t0, seen, window_loss = time.perf_counter(), 0, []
        deadline = time.monotonic() + 60 * t.time_limit_minutes if t.time_limit_minutes > 0 else math.inf
        try:
            while self.step < t.steps:
                if time.monotonic() > deadline:
                    self._print(f"time limit of {t.time_limit_minutes} min reached at step {self.step}")
                    break
                terms = self.train_step([next(data_iter) for _ in range(self.accum)])
                if terms is None:
                    bar.set_postfix_str(f"skipped non-finite steps {self.nonfinite_total}")
                    if self.nonfinite_run >= t.max_nonfinite:
                        path = self.save(self.run_dir / "checkpoints" / ck.step_dir_name(self.step))
                        raise UserError(f"{self.nonfinite_run} non-finite steps in a row at step {self.step}; "
                                        f"stopped, last good state saved in {path}")
                    continue
                self.step += 1
                seen += t.global_batch
                window_loss.append(terms["loss"])
                if self.step % t.log_every == 0 or self.step == t.steps:
                    values = {k if k in ("loss", "grad_norm") else f"loss/{k}": v.item() for k, v in terms.items()}
                    values["loss"] = torch.stack(window_loss).mean().item()
                    elapsed = time.perf_counter() - t0
                    values.update({"images_per_s": seen / elapsed, "lr": self.optim.lrs()["adamw"],
                                   "skipped_nonfinite": self.nonfinite_total, **self.data.stats()})
                    logger.log(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
                    t0, seen, window_loss = time.perf_counter(), 0, []
                bar.update(1)
                if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save(self.run_dir / "checkpoints" / ck.step_dir_name(self.step))
                    ck.prune(self.run_dir, t.keep_checkpoints)
                if t.sample_every and self.step % t.sample_every == 0:
                    self.sample_grid(ck.step_dir_name(self.step))
                if self._stop_signal is not None:
                    path = self.save(self.run_dir / "checkpoints" / ck.step_dir_name(self.step))
                    self._print(f"signal {self._stop_signal}: checkpoint at step {self.step} in {path}; exiting")
                    return path
            final = self.save(self.run_dir / "final")
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
    """Train `cfg` (resuming from its run directory's newest checkpoint); returns the final checkpoint."""
    return Trainer(cfg, progress=progress).fit()

