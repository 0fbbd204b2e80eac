"""`daybreak bench`: time the real training step on synthetic inputs and report throughput and MFU.

The step is `Trainer.step_once` itself (forward with the recipe's hooks, flow + ingredient losses,
backward, clipping, Muon/AdamW, EMA), run by the real `Trainer` given random tensors of the
configured shapes in place of the data loader and the text tower, so the number measures the model step, not the loader
or a text encoder. One step is one micro batch (`train.micro_batch` images, no accumulation).

Per phase: `phase_ms` is the median over the timed steps of each phase's wall time (data: to the
device and into model space; text; forward: the transformer and the recipe's losses; backward;
optimizer: gradient sync, clipping, Muon/AdamW; ema; the denoiser's keyed t and noise draws and its
flow loss fall between phases), from the trainer's `PhaseTimer`, which synchronises the
GPU at each boundary; the step time is measured on separate, untimed steps so that the phases'
syncs do not slow it. `optimizer_flops` / `optimizer_bytes` are Muon's Newton-Schulz FLOPs and the
bytes it receives per step on the busiest rank (`daybreak.optim.muon_cost`).

Under torchrun every rank runs the steps on its own synthetic micro batch (global batch = micro
batch × world size) and rank 0 prints the one line: step times and each phase are the slowest
rank's, images/s and tokens/s those of all ranks together.

MFU = analytic model FLOPs per step (`bench.flops`) / step time / peak; `mfu_forward_backward` the
same FLOPs over the forward and backward phases' time only (what the kernels reach, without the
optimizer, EMA and data phases). The peak is the dense
bf16 tensor-core figure of the GPU (table below) or, on a CPU, the fp32 matmul throughput measured
in the same process just before the steps: a CPU has no published peak that PyTorch can reach, and
measuring it under the same load makes the ratio comparable across busy machines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import time

import torch
from torch import Tensor, nn

from daybreak.bench.flops import parameter_count, train_flops
from daybreak.build import build_parts, build_recipe, model_kwargs
from daybreak.config import Config
from daybreak.optim import gram_form, muon_cost
from daybreak.recipe import block_tokens
from daybreak.space import PixelSpace, downscale_of
from daybreak.training import parallel
from daybreak.training.trainer import PhaseTimer, Trainer

PHASES = ("data", "text", "forward", "backward", "optimizer", "ema")

# dense bf16 tensor-core peaks (FLOP/s, no sparsity), from NVIDIA's data sheets (SXM parts)
GPU_PEAKS = {"B200": 2250e12, "H200": 989e12, "H100": 989e12, "A100": 312e12}


def gpu_peak(name: str) -> tuple[str, float] | None:
    """(table key, bf16 peak) for a device name such as 'NVIDIA H200', or None if not in the table."""
    for key, peak in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return key, peak
    return None


def cpu_matmul_peak(seconds: float = 1.0, size: int = 1024) -> float:
    """Best fp32 FLOP/s of a square matmul over `seconds`: the CPU's practical ceiling right now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_size(cfg: Config) -> int:
    """The square side the bench uses: the base resolution `data.image_size` (the square bucket)."""
    return cfg.data.image_size


class SyntheticText(nn.Module):
    """Fixed random text embeddings and a padding mask, behind the text encoders' `encode` interface.

    Sample i keeps the first L − i·L/(2B) tokens (at least one), so the masked attention path that
    real, padded captions take is the one measured.
    """

    def __init__(self, dim: int, length: int, batch: int, generator: torch.Generator):
        super().__init__()
        self.dim = dim
        self.register_buffer("emb", torch.randn(batch, length, dim, generator=generator))
        valid = [max(1, length - i * length // (2 * batch)) for i in range(batch)]
        self.register_buffer("mask", torch.arange(length)[None] < torch.tensor(valid)[:, None])

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.emb[: len(captions)], self.mask[: len(captions)]


class LatentStandIn(nn.Module):
    """Model space given directly: the bench draws latents, so no VAE is loaded."""

    def __init__(self, channels: int, downscale: int):
        super().__init__()
        self.channels, self.downscale = channels, downscale

    def encode(self, x: Tensor, keys: list[str] | None = None) -> Tensor:
        return x


class BenchRun:
    """The real `Trainer`, given synthetic text and images instead of a loader and a text tower;
    `step()` is one `Trainer.step_once` on one micro batch: the global batch is one micro batch per rank."""

    def __init__(self, cfg: Config) -> None:
        torch.manual_seed(cfg.seed)
        b = cfg.train.micro_batch
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=b * world))
        g = torch.Generator().manual_seed(cfg.seed)
        model = model_kwargs(cfg, context_dim=cfg.text.dim if cfg.text.kind == "demo" else None)
        text = SyntheticText(model["context_in_dim"], cfg.text.max_tokens, b, g)
        space = PixelSpace() if cfg.space.kind == "pixels" else LatentStandIn(model["in_channels"], downscale_of(cfg.space))
        parts = build_parts(cfg, text_encoder=text, space=space)
        self.trainer = Trainer(cfg, parts, None, build_recipe(cfg, parts), progress=False, log=lambda *_: None)
        side = image_size(cfg) // space.downscale
        pixels = torch.rand(b, space.channels, side, side, generator=g) * 2 - 1
        self.pixels, self.captions = pixels.to(self.trainer.device), ["a synthetic caption"] * b

    def step(self) -> None:
        self.trainer.step_once({"pixels": self.pixels, "captions": self.captions})


def _slowest(values: list[float], trainer: Trainer) -> list[float]:
    """Each value's maximum over ranks (itself in one process)."""
    if not trainer.dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=trainer.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def optimizer_cost(trainer: Trainer) -> dict[str, float]:
    """Muon's Newton-Schulz FLOPs and bytes received per step on the busiest rank (0 without Muon)."""
    muon = trainer.optim.optimizers.get("muon")
    if muon is None:
        return {"flops": 0.0, "bytes": 0.0}
    shapes = [tuple(p.shape) for g in muon.param_groups for p in g["params"]]
    size = next(p for g in muon.param_groups for p in g["params"]).element_size()
    return muon_cost(shapes, trainer.dist.world_size, muon.distributed, muon.defaults["ns_steps"], size,
                     gram=gram_form(trainer.device))


def bench(cfg: Config, steps: int = 10, warmup: int = 3) -> dict:
    """Warm up, then time `steps` training steps, then `steps` more phase by phase; returns the
    measurements as a flat dict."""
    run = BenchRun(cfg)
    trainer = run.trainer
    dev = trainer.device
    model = trainer.transformer.config
    b, side = cfg.train.micro_batch, image_size(cfg) // trainer.space.downscale
    n_img, n_txt = trainer.transformer.num_tokens(side, side), cfg.text.max_tokens
    tokens = block_tokens(cfg, n_img, model["depth"])
    flops = train_flops(model, b, n_img, n_txt, tokens)
    for _ in range(warmup):
        run.step()
    graphs = parallel.compiled_graphs()  # built in warm-up: one per block input shape
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        found = gpu_peak(name)
        peak_name, peak = (f"{found[0]} bf16 dense", found[1]) if found else (f"{name} (no table entry)", float("nan"))
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        peak_name, peak = "CPU fp32 matmul, measured", cpu_matmul_peak()
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        run.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    trainer.timer = PhaseTimer(dev)
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    for _ in range(steps):
        run.step()
        took = trainer.timer.take()
        for k in PHASES:
            phases[k].append(took.get(k, 0.0))
    trainer.timer = None
    times = _slowest(times, trainer)  # each step's slowest rank
    phase_ms = dict(zip(PHASES, _slowest([statistics.median(phases[k]) for k in PHASES], trainer)))
    mean, median = statistics.fmean(times), statistics.median(times)
    opt = optimizer_cost(trainer)
    return {
        "config": cfg.run.name, "device": str(dev), "precision": str(trainer.autocast_dtype or torch.float32),
        "params": parameter_count(model), "micro_batch": b, "image_size": side * trainer.space.downscale,
        "image_tokens": n_img, "text_tokens": n_txt, "block_tokens": tokens,
        "ingredients": list(trainer.ingredients), "steps": steps, "warmup": warmup,
        "ms_per_step": 1e3 * mean, "ms_per_step_median": 1e3 * median,
        "images_per_s": b * trainer.dist.world_size / mean, "tokens_per_s": b * trainer.dist.world_size * n_img / mean,
        "flops_per_step": flops, "achieved_flops": flops / mean, "peak": peak_name, "peak_flops": peak,
        "mfu": flops / mean / peak, "peak_memory_gib": peak_memory_bytes(dev) / 2**30,
        "mfu_forward_backward": flops / (1e-3 * (phase_ms["forward"] + phase_ms["backward"])) / peak,
        "phase_ms": phase_ms, "optimizer_flops": opt["flops"], "optimizer_bytes": opt["bytes"],
        "world_size": trainer.dist.world_size, "compile": bool(trainer.compiled),
        "compiled_graphs": parallel.compiled_graphs(), "recompiles_timed": parallel.compiled_graphs() - graphs,
    }  # fmt: skip


def format_table(result: dict) -> str:
    """The readable companion of the JSON line."""
    rows = [
        ("config", result["config"]),
        ("device / precision", f"{result['device']} / {result['precision']}"),
        ("model", f"{result['params'] / 1e6:.1f} M params, {result['image_tokens']} image + "
                  f"{result['text_tokens']} text tokens, micro batch {result['micro_batch']}"),
        ("recipe", ", ".join(result["ingredients"]) or "flow loss only"),
        ("step", f"{result['ms_per_step']:.1f} ms (median {result['ms_per_step_median']:.1f})"),
        ("throughput", f"{result['images_per_s']:.2f} images/s, {result['tokens_per_s']:.0f} tokens/s"),
        ("model FLOPs / step", f"{result['flops_per_step'] / 1e9:.1f} GFLOP"),
        ("achieved", f"{result['achieved_flops'] / 1e12:.3f} TFLOP/s"),
        ("peak", f"{result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak']})"),
        ("MFU", f"{100 * result['mfu']:.1f} % ({100 * result['mfu_forward_backward']:.1f} % of forward + backward)"),
        ("peak memory", f"{result['peak_memory_gib']:.2f} GiB"),
        ("phases (median ms)", ", ".join(f"{k} {v:.1f}" for k, v in result["phase_ms"].items())),
        ("optimizer / step", f"Newton-Schulz {result['optimizer_flops'] / 1e9:.2f} GFLOP, "
                             f"{result['optimizer_bytes'] / 2**20:.1f} MiB received (busiest rank)"),
    ]  # fmt: skip
    return "\n".join(f"{k:<20}{v}" for k, v in rows)


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3) -> dict:
    """The CLI's entry: the readable table on stderr, the one JSON line on stdout."""
    result = bench(cfg, steps=steps, warmup=warmup)
    if os.environ.get("RANK", "0") == "0":
        print(format_table(result), file=sys.stderr)
        print(json.dumps(result))
    return result
