"""`daybreak plan`: time, cost and per-GPU memory of a run's stages before renting the GPUs.

Time: analytic FLOPs per optimizer step (transformer, `bench.flops`, plus the recipe's frozen
networks, below) / (GPUs × bf16 dense peak × MFU). The MFU is an assumption (default 0.40) or a
number measured with `daybreak bench` on the target GPU. Cost: hours × GPUs × price per GPU-hour.

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

from dataclasses import dataclass

import torch

from daybreak.bench.flops import parameter_count, train_flops
from daybreak.bench.harness import GPU_PEAKS, image_size
from daybreak.config import Config
from daybreak.errors import UserError
from daybreak.model import build_transformer
from daybreak.optim import split_params
from daybreak.recipe import block_tokens
from daybreak.space import downscale_of
from daybreak.build import model_kwargs

GPU_MEMORY = {"b200": 180e9, "h200": 141e9, "h100": 80e9, "a100": 80e9}  # bytes, SXM data sheets
SEED_BUDGET = {"gpus": 32, "gpu": "h200", "hours": 24.0, "price": 2.0}  # Photoroom, "PRX part 3: a 24 h speedrun" (32 H200, ~24 h)

# frozen networks: (parameters, patch size, input side) -- ViT forward ≈ 2·params·(side/patch)²
TEACHERS = {"dinov3": (304e6, 16, None), "dinov2": (86e6, 14, 224), "dinov2-reg": (86e6, 14, 224)}
LPIPS_VGG = (14.7e6, 15.5e9 * 2)  # VGG16 conv trunk: parameters, FLOPs of one 224² forward


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


def activation_bytes(model: dict, batch: int, image_tokens: int, text_tokens: int, tokens: list[int] | None,
                     bytes_per_element: int, checkpointing: bool) -> float:
    """Saved activations of one micro batch (module docstring formula); `tokens`: image tokens per block."""
    d, m = model["hidden_size"], int(model["hidden_size"] * model["mlp_ratio"])
    ns = tokens if tokens is not None else [image_tokens] * model["depth"]
    full = [n * (18 * d + 4 * m) + 4 * text_tokens * d for n in ns]
    if checkpointing:
        return bytes_per_element * batch * (sum(n * d for n in ns) + max(full))
    return bytes_per_element * batch * sum(full)


def extra_flops_per_image(cfg: Config, side: int) -> float:
    """FLOPs of the recipe's frozen networks for one training image (module docstring)."""
    total = 0.0
    if cfg.repa.enabled and cfg.repa.teacher in TEACHERS:
        params, patch, res = TEACHERS[cfg.repa.teacher]
        total += 2 * params * ((res or side) // patch) ** 2
    if cfg.perceptual.enabled:
        params, patch, res = TEACHERS.get(cfg.perceptual.dino_kind, TEACHERS["dinov2-reg"])
        total += 3 * 2 * params * (res // patch) ** 2 if cfg.perceptual.dino_weight else 0.0
        total += 3 * LPIPS_VGG[1] * (side / 2 / 224) ** 2 if cfg.perceptual.lpips_weight else 0.0
    return total


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
    flops = train_flops(model, t.global_batch, n, cfg.text.max_tokens, routing)
    flops += t.global_batch * extra_flops_per_image(cfg, side)
    seconds = flops / (gpus * GPU_PEAKS[gpu.upper()] * mfu)
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
                 {**state, **act}, base + act["activations"] <= limit, base + act["activations_checkpointed"] <= limit)


def muon_parameters(model: dict) -> int:
    """How many of the transformer's parameters Muon trains (2-D matrices inside the blocks)."""
    with torch.device("meta"):
        muon, _ = split_params(build_transformer(**model))
    return sum(p.numel() for _, p in muon)


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
        # the MFU at which these stages would take exactly the seed's 24 h on this hardware
        "mfu_for_seed_hours": mfu * hours / seed["hours"],
    }  # fmt: skip


def format_plan(result: dict) -> str:
    gib = 2**30
    lines = [f"{result['gpus']} × {result['gpu'].upper()} at ${result['price']:.2f}/GPU-hour, assumed MFU "
             f"{100 * result['mfu']:.0f} % of the bf16 dense peak"]
    for s in result["stages"]:
        m = s.memory
        state = sum(v for k, v in m.items() if not k.startswith("activations"))
        fit = "fits" if s.fits else ("fits only with activation checkpointing" if s.fits_checkpointed
                                     else "DOES NOT FIT, even with checkpointing: lower train.micro_batch")
        lines += [
            f"\n{s.name}: {s.steps} steps × {s.global_batch} images ({s.image_tokens} tokens), micro batch "
            f"{s.micro_batch}",
            f"  {s.flops_per_step / 1e15:.2f} PFLOP/step -> {3600 * s.hours / s.steps:.2f} s/step, "
            f"{s.hours:.1f} h, ${s.cost:,.0f}",
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
        f"{100 * result['mfu_for_seed_hours']:.1f} % MFU",
    ]
    return "\n".join(lines)
