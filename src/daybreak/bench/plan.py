"""`daybreak plan`: time, cost and per-GPU memory of a run's stages before renting the GPUs.

Time: the step of one GPU, term by term (seconds; G GPUs, P parameters, B the global batch):
    model        transformer fwd+bwd FLOPs (`bench.flops`) / G / (bf16 dense peak × MFU)
    frozen nets  each network's FLOPs on B/G images (below), at the same rate
    text         T5-Gemma's encoder on B/G captions, 2·params·tokens each, unless text.cache_dir
                 holds the embeddings
    muon         Newton-Schulz FLOPs on the busiest rank (`optim.muon_cost`: 1/G of them when
                 optim.muon_distributed, all of them on every rank otherwise) at the same rate, plus
                 the bytes it receives over the interconnect (bf16 when distributed, the fp32
                 gather otherwise) and its momentum update (20 bytes/param through HBM)
    adamw        28 bytes per AdamW parameter / G through HBM (read p, g, m, v; write p, m, v)
    ema          12 bytes per parameter / G through HBM, every `ema.every` steps
    fsdp         all-gather of the bf16 weights in forward and again in backward, reduce-scatter of
                 the fp32 gradients: (2·2 + 4)·P·(G − 1)/G bytes over the interconnect. FSDP
                 prefetches, so only what exceeds the model's compute adds to the step.
The interconnect is NVLink inside one 8-GPU node and InfiniBand across nodes, whose per-GPU link
(one 400 Gb/s NDR NIC per GPU, as in NVIDIA's DGX H100/H200) bounds a ring collective. The
bottleneck is the largest term. The loader must deliver B / step images per second. The MFU is an
assumption (default 0.40) or a number measured with `daybreak bench` on the target GPU. Cost:
hours × GPUs × price per GPU-hour.

Memory per GPU (bytes; P transformer parameters, G GPUs, FSDP full sharding of the fp32 state):
    weights 4P/G, gradients 4P/G, EMA 4P/G,
    optimizer 4·P_muon/G (Muon: one momentum buffer) + 8·P_adamw/G (AdamW: two moments),
    frozen networks (teachers, LPIPS): fp32, replicated on every GPU,
    activations of one micro batch of b samples, each block on its n image tokens (n = K in a
    routed span) and L text tokens, s bytes per element (2 under bf16 autocast, else 4):
        s·b·Σ_blocks [n·(18·d + 4·m) + 4·L·d]
    with activation checkpointing per block only the block inputs stay, s·b·Σ n·d, plus one
    block's full activations while it is recomputed. The 18·d + 4·m elements per token are what
    autograd saves in a daybreak block (measured with saved-tensor hooks; `tests/test_bench.py`
    checks it); flash attention keeps no N² scores. Embeddings, the final layer, the loss and
    allocator slack are left out, so a micro batch is flagged when the total exceeds 90 % of the
    GPU's memory.

Frozen networks' FLOPs per image: a ViT teacher forward costs 2·params·tokens; REPA runs its
teacher once (target only); the DINO and LPIPS perceptual losses run their network on the target
and on x̂0 and backpropagate to x̂0 (input gradient only: one more forward's worth), so 3 forwards.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from daybreak.bench.flops import parameter_count, train_flops
from daybreak.bench.harness import GPU_PEAKS, image_size
from daybreak.config import Config
from daybreak.errors import UserError
from daybreak.model import build_transformer
from daybreak.optim import muon_cost, schedule_from_config, split_params
from daybreak.recipe import block_tokens
from daybreak.space import downscale_of
from daybreak.build import model_kwargs

GPU_MEMORY = {"b200": 180e9, "h200": 141e9, "h100": 80e9, "a100": 80e9}  # bytes, SXM data sheets
SEED_BUDGET = {"gpus": 32, "gpu": "h200", "hours": 24.0, "price": 2.0}  # Photoroom, "PRX part 3: a 24 h speedrun" (32 H200, ~24 h)

# frozen networks: (parameters, patch size, input side) -- ViT forward ≈ 2·params·(side/patch)²
TEACHERS = {"dinov3": (304e6, 16, None), "dinov2": (86e6, 14, 224), "dinov2-reg": (86e6, 14, 224)}
LPIPS_VGG = (14.7e6, 15.5e9 * 2)  # VGG16 conv trunk: parameters, FLOPs of one 224² forward
TEXT_ENCODER_PARAMS = {"t5gemma": 2.0e9}  # google/t5gemma-2b-2b-ul2's encoder (model card)
# bytes/s per GPU, NVIDIA data sheets: HBM; NVLink one way (half the bidirectional figure)
HBM_BANDWIDTH = {"b200": 8.0e12, "h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12}
NVLINK_BANDWIDTH = {"b200": 900e9, "h200": 450e9, "h100": 450e9, "a100": 300e9}
INFINIBAND_BANDWIDTH = 50e9  # one 400 Gb/s NDR ConnectX-7 per GPU
GPUS_PER_NODE = 8


@dataclass
class Stage:
    name: str
    steps: int
    global_batch: int
    micro_batch: int
    image_tokens: int
    flops_per_step: float
    hours: float
    cost: float
    memory: dict[str, float]  # bytes per GPU
    fits: bool
    fits_checkpointed: bool
    seconds: dict[str, float]  # the step's terms per GPU (module docstring); "fsdp" overlaps "model"
    step_seconds: float
    bottleneck: str
    images_per_s: float  # what the loader must deliver, all GPUs together
    schedule: str = ""  # the learning-rate schedule, in words


def activation_bytes(model: dict, batch: int, image_tokens: int, text_tokens: int, tokens: list[int] | None,
                     bytes_per_element: int, checkpointing: bool) -> float:
    """Saved activations of one micro batch (module docstring formula); `tokens`: image tokens per block."""
    d, m = model["hidden_size"], int(model["hidden_size"] * model["mlp_ratio"])
    ns = tokens if tokens is not None else [image_tokens] * model["depth"]
    full = [n * (18 * d + 4 * m) + 4 * text_tokens * d for n in ns]
    if checkpointing:
        return bytes_per_element * batch * (sum(n * d for n in ns) + max(full))
    return bytes_per_element * batch * sum(full)


def frozen_flops_per_image(cfg: Config, side: int) -> dict[str, float]:
    """FLOPs of each of the recipe's frozen networks for one training image (module docstring)."""
    out = {}
    if cfg.repa.enabled and cfg.repa.teacher in TEACHERS:
        params, patch, res = TEACHERS[cfg.repa.teacher]
        out["repa_teacher"] = 2 * params * ((res or side) // patch) ** 2  # forward on the target only
    if cfg.perceptual.enabled:
        params, patch, res = TEACHERS.get(cfg.perceptual.dino_kind, TEACHERS["dinov2-reg"])
        if cfg.perceptual.dino_weight:  # target and x̂0 forwards + the input gradient to x̂0
            out["dino_loss"] = 3 * 2 * params * (res // patch) ** 2
        if cfg.perceptual.lpips_weight:
            out["lpips"] = 3 * LPIPS_VGG[1] * (side / 2 / 224) ** 2
    return out


def extra_flops_per_image(cfg: Config, side: int) -> float:
    """FLOPs of the recipe's frozen networks for one training image, all together."""
    return sum(frozen_flops_per_image(cfg, side).values())


def interconnect_bandwidth(gpu: str, gpus: int) -> float:
    """Per-GPU bytes/s of a ring collective: NVLink within one node, InfiniBand across nodes."""
    return NVLINK_BANDWIDTH[gpu] if gpus <= GPUS_PER_NODE else INFINIBAND_BANDWIDTH


def step_seconds(cfg: Config, model: dict, gpus: int, gpu: str, mfu: float, model_flops: float, side: int
                 ) -> dict[str, float]:
    """The terms of one GPU's step (module docstring), seconds."""
    rate, hbm, link = GPU_PEAKS[gpu.upper()] * mfu, HBM_BANDWIDTH[gpu], interconnect_bandwidth(gpu, gpus)
    per_gpu = cfg.train.global_batch / gpus
    out = {"model": model_flops / gpus / rate}
    out |= {name: per_gpu * f / rate for name, f in frozen_flops_per_image(cfg, side).items()}
    if cfg.text.kind in TEXT_ENCODER_PARAMS and not cfg.text.cache_dir:
        out["text"] = per_gpu * 2 * TEXT_ENCODER_PARAMS[cfg.text.kind] * cfg.text.max_tokens / rate
    p = parameter_count(model)
    shapes = muon_shapes(model) if cfg.optim.name == "muon" else []
    p_muon = sum(m * n for m, n in shapes)
    if shapes:
        o = cfg.optim
        cost = muon_cost(shapes, gpus, o.muon_distributed, o.muon_ns_steps, 2 if o.muon_distributed else 4)
        out["muon"] = cost["flops"] / rate + cost["bytes"] / link + 20 * p_muon / gpus / hbm
    out["adamw"] = 28 * (p - p_muon) / gpus / hbm
    if getattr(cfg.ema, "enabled", True):
        out["ema"] = 12 * p / gpus / hbm / cfg.ema.every
    out["fsdp"] = (2 * 2 + 4) * p * (gpus - 1) / gpus / link
    return out


def frozen_bytes(cfg: Config) -> float:
    params = 0.0
    if cfg.repa.enabled and cfg.repa.teacher in TEACHERS:
        params += TEACHERS[cfg.repa.teacher][0]
    if cfg.perceptual.enabled:
        params += TEACHERS.get(cfg.perceptual.dino_kind, TEACHERS["dinov2-reg"])[0] + LPIPS_VGG[0]
    return 4 * params


def plan_stage(cfg: Config, gpus: int, gpu: str, price: float, mfu: float) -> Stage:
    if gpu not in GPU_MEMORY:
        raise UserError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPU_MEMORY)}")
    if gpus < 1 or not 0 < mfu <= 1:
        raise UserError(f"--gpus must be >= 1 and --mfu in (0, 1], got {gpus} and {mfu}")
    t = cfg.train
    if t.global_batch % (t.micro_batch * gpus):
        raise UserError(f"{cfg.run.name}: train.global_batch={t.global_batch} is not a multiple of "
                        f"train.micro_batch × GPUs = {t.micro_batch} × {gpus}")
    context = cfg.text.dim if cfg.text.kind == "demo" else None
    model = model_kwargs(cfg, context_dim=context)
    side = image_size(cfg)
    n = (side // downscale_of(cfg.space) // model["patch_size"]) ** 2
    routing = block_tokens(cfg, n, model["depth"])
    model_flops = train_flops(model, t.global_batch, n, cfg.text.max_tokens, routing)
    flops = model_flops + t.global_batch * extra_flops_per_image(cfg, side)
    terms = step_seconds(cfg, model, gpus, gpu, mfu, model_flops, side)
    exposed = {**terms, "fsdp": _exposed(terms)}  # prefetch hides the rest
    seconds = sum(exposed.values())
    hours = t.steps * seconds / 3600
    p = parameter_count(model)
    p_muon = muon_parameters(model) if cfg.optim.name == "muon" else 0
    s = 4 if cfg.train.precision == "fp32" else 2
    act = dict(
        activations=activation_bytes(model, t.micro_batch, n, cfg.text.max_tokens, routing, s, False),
        activations_checkpointed=activation_bytes(model, t.micro_batch, n, cfg.text.max_tokens, routing, s, True),
    )
    state = dict(weights=4 * p / gpus, gradients=4 * p / gpus, optimizer=(4 * p_muon + 8 * (p - p_muon)) / gpus,
                 ema=4 * p / gpus, frozen_networks=frozen_bytes(cfg))  # fmt: skip
    base = sum(state.values())
    limit = 0.9 * GPU_MEMORY[gpu]
    return Stage(cfg.run.name, t.steps, t.global_batch, t.micro_batch, n, flops, hours, hours * gpus * price,
                 {**state, **act}, base + act["activations"] <= limit, base + act["activations_checkpointed"] <= limit,
                 terms, seconds, max(exposed, key=exposed.get), t.global_batch / seconds,
                 schedule_from_config(cfg.optim, t.steps).describe())


def muon_shapes(model: dict) -> list[tuple[int, int]]:
    """Shapes of the matrices Muon trains (2-D parameters inside the blocks)."""
    return list(_muon_shapes(json.dumps(model, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _muon_shapes(model: str) -> tuple[tuple[int, int], ...]:
    with torch.device("meta"):
        muon, _ = split_params(build_transformer(**json.loads(model)))
    return tuple(tuple(p.shape) for _, p in muon)


def muon_parameters(model: dict) -> int:
    """How many of the transformer's parameters Muon trains."""
    return sum(m * n for m, n in muon_shapes(model))


def plan(configs: list[Config], gpus: int, gpu: str = "h200", price: float = 2.0, mfu: float = 0.4) -> dict:
    """Every stage's estimate, the totals, and the seed's budget for comparison."""
    gpu = gpu.lower()
    stages = [plan_stage(c, gpus, gpu, price, mfu) for c in configs]
    hours = sum(s.hours for s in stages)
    seed = SEED_BUDGET
    return {
        "gpus": gpus, "gpu": gpu, "price": price, "mfu": mfu, "stages": stages, "hours": hours,
        "cost": hours * gpus * price,
        "seed": {**seed, "cost": seed["gpus"] * seed["hours"] * seed["price"]},
        "mfu_for_seed_hours": mfu_for_hours(configs, gpus, gpu, seed["hours"]),
    }  # fmt: skip


def mfu_for_hours(configs: list[Config], gpus: int, gpu: str, hours: float) -> float | None:
    """The MFU at which these stages take `hours` on this hardware (bisection: only the compute terms
    scale with it), or None when even 100 % would not (the memory and link terms alone exceed it)."""
    def total(mfu: float) -> float:
        return sum(plan_stage(c, gpus, gpu, 0.0, mfu).hours for c in configs)

    if total(1.0) > hours:
        return None
    lo, hi = 1e-4, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > hours else (lo, mid)
    return hi


def _exposed(seconds: dict[str, float]) -> float:
    """The FSDP traffic that the model's compute cannot hide."""
    return max(0.0, seconds["fsdp"] - seconds["model"])


def format_plan(result: dict) -> str:
    gib = 2**30
    gpu, link = result["gpu"], interconnect_bandwidth(result["gpu"], result["gpus"])
    lines = [f"{result['gpus']} × {gpu.upper()} at ${result['price']:.2f}/GPU-hour, assumed MFU "
             f"{100 * result['mfu']:.0f} % of the bf16 dense peak; HBM {HBM_BANDWIDTH[gpu] / 1e12:.2f} TB/s, "
             f"interconnect {link / 1e9:.0f} GB/s per GPU ("
             + ("NVLink" if result["gpus"] <= GPUS_PER_NODE else "InfiniBand NDR 400 Gb/s") + ")"]
    for s in result["stages"]:
        m = s.memory
        state = sum(v for k, v in m.items() if not k.startswith("activations"))
        fit = "fits" if s.fits else ("fits only with activation checkpointing" if s.fits_checkpointed
                                     else "DOES NOT FIT, even with checkpointing: lower train.micro_batch")
        lines += [
            f"\n{s.name}: {s.steps} steps × {s.global_batch} images ({s.image_tokens} tokens), micro batch "
            f"{s.micro_batch}",
            f"  {s.flops_per_step / 1e15:.2f} PFLOP/step -> {s.step_seconds:.3f} s/step, "
            f"{s.hours:.1f} h, ${s.cost:,.0f}; bottleneck: {s.bottleneck}",
            "  step/GPU    " + ", ".join(f"{k} {1e3 * v:.1f} ms ({100 * v / s.step_seconds:.1f} %)"
                                         for k, v in s.seconds.items() if k != "fsdp")
            + f", fsdp {1e3 * s.seconds['fsdp']:.1f} ms of which {1e3 * _exposed(s.seconds):.1f} ms exposed "
            f"({100 * _exposed(s.seconds) / s.step_seconds:.1f} %)",
            f"  loader      {s.images_per_s:,.0f} images/s ({s.images_per_s / result['gpus']:,.0f} per GPU)",
            f"  lr          {s.schedule}",
            "  memory/GPU  " + ", ".join(f"{k} {v / gib:.1f}" for k, v in m.items() if not k.startswith("act"))
            + " GiB",
            f"  activations {m['activations'] / gib:.1f} GiB ({m['activations_checkpointed'] / gib:.1f} checkpointed)"
            f" -> total {(state + m['activations']) / gib:.1f} GiB: {fit}",
        ]
    seed = result["seed"]
    lines += [
        f"\nestimate: {result['hours']:.1f} h, ${result['cost']:,.0f}",
        f"seed:     {seed['hours']:.0f} h, ${seed['cost']:,.0f} ({seed['gpus']} × {seed['gpu'].upper()} at "
        f"${seed['price']:.0f}/GPU-hour); matching its 24 h on this hardware means "
        + (f"{100 * result['mfu_for_seed_hours']:.1f} % MFU" if result["mfu_for_seed_hours"] is not None
           else "more than 100 % MFU"),
    ]
    return "\n".join(lines)
