"""The denoiser: everything that makes the transformer an x-prediction flow model, in one place.

Rectified flow with x-prediction, as in PRX and JiT (Li & He 2025, "Back to Basics: Let Denoising
Generative Models Denoise"). The trainer, the sampler and contrastive flow matching all read
what the network's output means from here.

The path is linear, `x_t = (1 - t)·x0 + t·noise` (t = 1 is pure noise). The network predicts the
clean sample x̂0 (or, as an ablation, the velocity `noise - x0`), but the x-prediction loss is taken
in velocity space, `v = (x_t - x0) / max(t, t_clamp)`: this weights low-noise timesteps like a
v-loss would while the clamp keeps the 1/t factor finite near t = 0. Timesteps are logit-normal,
shifted towards noise (high resolutions need more noise to destroy their structure), plus a small
fraction of unshifted uniform draws so no noise level is starved. The shift may be annealed over
the run (`objective.shift_end`): a high shift first, where the caption decides colour, place and
shape, a low one last, where edges and patch borders are drawn (coarse-to-fine, as the noise-level
curricula of Kim et al. 2024, "Denoising Task Difficulty-based Curriculum for Training Diffusion
Models", order them).

Every per-sample random draw of a training step (caption dropout, t, noise) comes from a generator
keyed on (seed, global sample number), so a step's draws do not depend on the world size, the micro
batch split or a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from daybreak.devices import to_device
from daybreak.errors import UserError
from daybreak.schema import ranged


def shift_time(t: Tensor, s: float) -> Tensor:
    """Resolution shift of a timestep towards noise: t' = s·t / (1 + (s - 1)·t)."""
    return s * t / (1 + (s - 1) * t)


def per_sample(t: Tensor, like: Tensor) -> Tensor:
    """View a (B,) tensor so that it broadcasts against a (B, ...) tensor."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def sample_timesteps(
    n: int,
    *,
    generator: torch.Generator | None = None,
    shift: float = 3.0,
    uniform_prob: float = 0.1,
    mean: float = 0.0,
    std: float = 1.0,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n,) training timesteps: shifted logit-normal on [t_min, t_max), a `uniform_prob` share unshifted uniform."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise UserError(f"timestep range needs 0 <= t_min < t_max <= 1, got [{t_min}, {t_max})")
    if device is None:
        device = generator.device if generator is not None else "cpu"

    def logit_normal(k: int) -> Tensor:
        return torch.sigmoid(mean + std * torch.randn(k, generator=generator, device=device))

    t = logit_normal(n)
    outside = (t < t_min) | (t >= t_max)
    while outside.numpy().any() if outside.device.type == "cpu" else outside.any():
        t[outside] = logit_normal(int(outside.sum()))
        outside = (t < t_min) | (t >= t_max)
    t = shift_time(t, shift)
    uniform = t_min + (t_max - t_min) * torch.rand(n, generator=generator, device=device)
    use_uniform = torch.rand(n, generator=generator, device=device) < uniform_prob
    return torch.where(use_uniform, uniform, t)


PREDICTIONS = ("x", "v")


@dataclass
class ObjectiveConfig:
    """Config section `objective`: the prediction target, the loss's t clamp, the timestep law, caption dropout."""

    prediction: Literal[PREDICTIONS] = "x"
    t_clamp: float = ranged(0.05, gt=0, le=1)
    shift: float = ranged(3.0, gt=0)
    shift_end: float | None = ranged(None, gt=0)  # a shift annealed linearly from `shift` at step 0 to this at the last step
    uniform_prob: float = ranged(0.1, ge=0, le=1)
    logit_mean: float = 0.0
    logit_std: float = ranged(1.0, gt=0)
    caption_dropout: float = ranged(0.1, ge=0, lt=1)


def caption_keep_mask(
    batch: int, p_drop: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """(batch,) bool: True where the caption is kept, False where it becomes the null caption."""
    if not 0.0 <= p_drop <= 1.0:
        raise UserError(f"caption dropout must be in [0, 1], got {p_drop}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.rand(batch, generator=generator, device=device) >= p_drop


def sample_key(seed: int, number: int) -> int:
    """A 63-bit generator seed for global sample `number` of run `seed` (mixed, so neighbours differ)."""
    return ((seed + 1) * 0x9E3779B97F4A7C15 + number * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def training_shift(shift: float, shift_end: float | None, step: int, steps: int) -> float:
    """The timestep shift of training step `step` (0-based) of `steps`: `shift` throughout, or moved
    linearly from `shift` at the first step to `shift_end` at the last (and held past it)."""
    if shift_end is None:
        return shift
    done = min(1.0, step / (steps - 1)) if steps > 1 else 1.0
    return shift + (shift_end - shift) * done


class Denoised(NamedTuple):
    """One micro batch through the denoiser: the per-sample flow loss (B,) and what extra losses read."""

    loss: Tensor
    x_t: Tensor
    t: Tensor
    noise: Tensor
    x0_hat: Tensor


class Denoiser:
    """The network's surroundings that make it a flow model (JiT's `Denoiser`, minRF's `RF`, without the
    network): the keyed draws, x_t, what the output means, the loss, and the sampler's velocity.

    Built once per run (`daybreak.build.build_parts`) from the `objective` section, read duck-typed, and
    the run's seed, global batch (a sample's step is its number ÷ it) and length (the annealed shift).
    The trainer, the validation loss, the sampler and the recipe's velocity-space losses all take this
    one instance, so a new timestep law or prediction target is an edit here only.
    """

    def __init__(self, objective, *, seed: int, global_batch: int, steps: int) -> None:
        self.objective, self.seed, self.global_batch, self.steps = objective, seed, global_batch, steps
        self.prediction, self.t_clamp = objective.prediction, objective.t_clamp
        # the sampler's clamp: PRX's v-models return the velocity itself, unclamped
        # (prx/pipeline/fm_pipeline.py clamps only in convert_x_to_v), so their last Euler step lands on x̂0
        self.sampling_clamp = self.t_clamp if self.prediction == "x" else 0.0

    def __call__(self, x0: Tensor, first: int, predict: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Denoised:
        """The flow loss of the clean samples `x0`, global samples `first`, `first + 1`, ...: their draws,
        x_t, and the network's output `predict(x_t, t, keep)`, where `keep` ((B,) bool, on the host) is
        False for a caption to replace with the null caption (classifier-free guidance's dropout)."""
        keep, t, noise = self.draws(range(first, first + x0.shape[0]), tuple(x0.shape[1:]), x0.device)
        x_t = self.noisy(x0, noise, t)
        loss, x0_hat = self.loss(predict(x_t, t, keep), x0, x_t, noise, t)
        return Denoised(loss, x_t, t, noise, x0_hat)

    def draws(self, numbers: range, shape: tuple[int, ...], device: torch.device | str
              ) -> tuple[Tensor, Tensor, Tensor]:
        """(keep caption (B,) bool on the host, t (B,) and noise (B, *shape) on `device`) for the global
        samples `numbers`, each from its own generators keyed on (seed, number).

        The caption decision and t come from a host generator, so nothing here waits for the device:
        the captions are chosen on the host, and t reaches the device in one non-blocking copy. The
        noise comes from a generator on `device` with the same key (on a CPU, the same generator,
        after the host draws: one stream per sample).
        """
        o, device = self.objective, torch.device(device)
        keep, ts, noise = [], [], []
        for n in numbers:
            g = torch.Generator().manual_seed(sample_key(self.seed, n))
            keep.append(caption_keep_mask(1, o.caption_dropout, g))
            shift = training_shift(o.shift, o.shift_end, n // self.global_batch, self.steps)
            ts.append(sample_timesteps(1, generator=g, shift=shift, uniform_prob=o.uniform_prob, mean=o.logit_mean,
                                       std=o.logit_std))
            if device.type != "cpu":
                g = torch.Generator(device=device).manual_seed(sample_key(self.seed, n))
            noise.append(torch.randn(shape, generator=g, device=device))
        return torch.cat(keep), to_device(torch.cat(ts), device), torch.stack(noise)

    @staticmethod
    def noisy(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t)·x0 + t·noise, with t (B,) per sample."""
        t = per_sample(t, x0)
        return (1 - t) * x0 + t * noise

    def x0_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The clean-sample estimate; a v-model outputs noise - x0, so x̂0 = x_t - t·v."""
        return out if self.prediction == "x" else x_t - per_sample(t, x_t) * out

    def velocity(self, x0_hat: Tensor, x_t: Tensor, t: Tensor, t_clamp: float | None = None) -> Tensor:
        """The flow velocity implied by a clean estimate, (x_t - x̂0) / max(t, t_clamp): the training clamp
        unless another is given (the sampler gives `sampling_clamp`)."""
        return (x_t - x0_hat) / per_sample(t, x_t).clamp(min=self.t_clamp if t_clamp is None else t_clamp)

    def loss(self, out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample mean squared error (B,), in fp32, and the clean estimate x̂0 (for the perceptual losses)."""
        out = out.float()
        x0_hat = self.x0_from_output(out, x_t, t)
        if self.prediction == "x":
            err = self.velocity(x0_hat, x_t, t) - self.velocity(x0, x_t, t)
        else:
            err = out - (noise - x0)
        return err.pow(2).flatten(1).mean(1), x0_hat
