"""`daybreak plan`: time, cost and per-GPU memory of a run's stages before renting the GPUs.

Time: the step of one GPU, term by term (seconds; G GPUs, P parameters, B the global batch):
    model        transformer fwd+bwd FLOPs (`bench.flops`) / G / (bf16 dense peak × MFU)
    frozen nets  each network's FLOPs on B/G images (below), at the same rate (they run under bf16
                 autocast on CUDA)
    text         T5-Gemma's encoder on B/G captions, 2·params·tokens each, at `text.dtype`'s rate
                 (bf16, the default on CUDA; fp32 runs on TF32 tensor cores: half the bf16 peak),
                 unless text.cache_dir holds the embeddings; then nothing: the data loader's workers
                 read the cached captions (3.1 ms of host time each, measured: ~100 ms per 32), off
                 the step's critical path; they are counted against the loader (below)
    eval         periodic evaluation and sample grids, per step: each rank's share ⌈num / G⌉ of the
                 images × sampler steps × forwards per step (2 with CFG or self-guidance, 3 with
                 both, 1 without; a routed forward counted as dense) × one image's forward FLOPs,
                 every `eval.every` (`train.sample_every`) steps, at the model's rate
    muon         Newton-Schulz FLOPs on the busiest rank (`optim.muon_cost`: 1/G of them when
                 optim.muon_distributed, all of them on every rank otherwise) at the same rate, plus
                 the bytes it receives over the interconnect (bf16 when distributed, the fp32
                 gather otherwise) and its momentum update (20 bytes/param through HBM)
    adamw        28 bytes per AdamW parameter / G through HBM (read p, g, m, v; write p, m, v)
    ema          12 bytes per parameter / G through HBM, every `ema.every` steps
    fsdp         all-gather of the bf16 weights in forward and again in backward, reduce-scatter of
                 the fp32 gradients: (2·2 + 4)·P·(G − 1)/G bytes over the interconnect. FSDP
                 prefetches, so only what exceeds the model's compute adds to the step.
Compile warm-up, once per stage: one graph per block input shape, 30 s each for training's forward +
backward (assumed; `scripts/gpu_check.sh` measures it), 4.8 s for a forward-only one (measured by PyTorch
on FLUX.1-dev, `COMPILE_SECONDS_PER_INFERENCE_GRAPH`), added to the stage's hours. A block's inputs are (B, N, d) tokens, its RoPE table (B, N, …),
the text and the modulation vector: its graph depends on the token count N, not on the bucket's height
and width, so a bucket and its transpose (and any two buckets of equal area) share a graph, and the blocks
share them all (regional compilation: one code object, inline_inbuilt_nn_modules, PyTorch's "Reducing
torch.compile cold start compilation time with regional compilation"; tests/integration/test_train.py
counts one graph per token count for 4 blocks). The count is the distinct dense and routed token counts
over the buckets (512 px: 6 dense + 6 routed = 12; 1024 px: 13 + 11 = 24). Periodic eval and sample
grids run without autograd, which Dynamo guards on, so their forwards build graphs of their own, one per
(batch, tokens) they feed a block (`inference_shapes`; the speedrun's self-guided eval and grids: 4 a stage).
The interconnect is NVLink inside one 8-GPU node and InfiniBand across nodes, whose per-GPU link
(one 400 Gb/s NDR NIC per GPU, as in NVIDIA's DGX H100/H200) bounds a ring collective. The
bottleneck is the largest term. The loader must deliver B / step images per second; with the text cache
its workers also read each image's caption embeddings, which keeps B / step / G × 3.1 ms of loader
workers busy on each GPU (`text_cache_workers`; data.num_workers must exceed it). The MFU is an
assumption (default 0.40) or a number measured with `daybreak bench` on the target GPU. Cost:
hours × GPUs × price per GPU-hour.

Memory per GPU (bytes; P transformer parameters, G GPUs, FSDP full sharding of the fp32 state):
    weights 4P/G, gradients 4P/G, EMA 4P/G,
    optimizer 4·P_muon/G (Muon: one momentum buffer) + 8·P_adamw/G (AdamW: two moments),
    frozen networks (teachers, LPIPS): fp32 weights (bf16 is autocast's), replicated on every GPU,
    the text encoder at `text.dtype` (2 bytes/param in bf16, 4 in fp32), resident whenever the
    config names a pretrained one (the cache wraps the encoder, it does not replace it),
    activations of one micro batch of b samples, each block on its n image tokens (n = K in a
    routed span) and L text tokens, s bytes per element (2 under bf16 autocast, else 4):
        s·b·Σ_blocks [n·(18·d + 4·m) + 4·L·d]
    with activation checkpointing per block only the block inputs stay, s·b·Σ n·d, plus one
    block's full activations while it is recomputed. The 18·d + 4·m elements per token are what
    autograd saves in a daybreak block (measured with saved-tensor hooks; `tests/test_bench.py`
    checks it); flash attention keeps no N² scores. Embeddings, the final layer, the loss and
    allocator slack are left out, so a micro batch is flagged when the total exceeds 90 % of the
    GPU's memory.

Frozen networks' FLOPs per image: a ViT teacher forward costs 2·params·tokens, tokens = patches +
prefix (CLS and registers); REPA runs its teacher once (target only) on the image resized to the
model's token grid × the teacher's patch (PRX small at 512 px: 16×16 tokens, so DINOv3 ViT-L/16
sees 256 px: 256 + 5 = 261 tokens); the DINO and LPIPS perceptual losses run their network on the
target and on x̂0 and backpropagate to x̂0 (input gradient only: one more forward's worth), so 3
forwards, DINO at `perceptual.dino_resolution`.

Layouts (`Layout`, from train.replicate / reduce_dtype / fp8 / keep_gathered_blocks; `--compare` prices
several side by side). With N = train.replicate HSDP replicas of S = G/N GPUs each:
    fsdp         inside a replica: the bf16 weights all-gathered in forward and again in backward for
                 all but the `keep_gathered` last blocks (float8, 1 byte, for FP8 layers under
                 tensorwise scaling), the gradients reduce-scattered in the reduce dtype (r bytes):
                 (gathered bytes + r·P)·(S − 1)/S over NVLink when S ≤ 8; across replicas each GPU
                 all-reduces its 1/S of the gradients over InfiniBand: 2·r·(P/S)·(N − 1)/N.
                 N = 1 is the FSDP formula above. Both overlap the model's compute.
    adamw, ema   on the sharded state: 1/S of it on each GPU (every replica updates its own copy)
    muon         owners over all G ranks (`optim.muon_cost` with N replicas): 1/G of the Newton-Schulz FLOPs;
                 an owner gathers its matrices from its own replica (NVLink) and sends every replica
                 its rows of the results, (N − 1)/N of each rank's rows arriving over InfiniBand
                 (the trade-off in `optim._orthogonalise_owned`)
    model        with train.fp8, the blocks' linear layers (q/k/v, out, text k/v, MLP: 3 × their
                 forward FLOPs) at the FP8 dense peak (2× bf16) × MFU × FP8_EFFICIENCY, the rest at
                 the bf16 rate
    memory       the sharded state divided by S instead of G, plus the bf16 weights of the blocks kept
                 gathered from forward to backward.
FP8_EFFICIENCY is what torchao's float8 delivered end to end in torchtitan (Llama 3 8B on 8 H100, torch.compile:
1.25× bf16 tensorwise with float8 all-gather, 1.11× rowwise, linears ≈ 85 % of the FLOPs): the linears
then ran 1.31× / 1.13× faster than bf16, 0.65 / 0.57 of the FP8 peak's promise. PRX small's matmuls are
narrower (d 1792, MLP 6272 against 4096 / 14336), so the casts weigh more there: measure with
`scripts/gpu_check.sh` (its `bench_fp8_*` steps) and pass the measured MFU.

Frozen networks' FLOPs per image: a ViT teacher forward costs 2·params·tokens; REPA runs its
teacher once (target only); the DINO and LPIPS perceptual losses run their network on the target
and on x̂0 and backpropagate to x̂0 (input gradient only: one more forward's worth), so 3 forwards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import torch

from daybreak.bench.flops import forward_flops, parameter_count, train_flops
from daybreak.bench.harness import GPU_PEAKS, image_size
from daybreak.config import Config
from daybreak.data.buckets import resolve_buckets
from daybreak.diffusion.sampling import GUIDANCE
from daybreak.errors import UserError
from daybreak.model import build_transformer
from daybreak.optim import muon_cost, schedule_from_config, split_params
from daybreak.recipe import INGREDIENTS, block_tokens, enabled
from daybreak.space import downscale_of
from daybreak.build import model_kwargs

GPU_MEMORY = {"b200": 180e9, "h200": 141e9, "h100": 80e9, "a100": 80e9}  # bytes, SXM data sheets
SEED_BUDGET = {"gpus": 32, "gpu": "h200", "hours": 24.0, "price": 2.0}  # Photoroom, "PRX part 3: a 24 h speedrun" (32 H200, ~24 h)

TEXT_ENCODER_PARAMS = {"t5gemma": 2.0e9,  # google/t5gemma-2b-2b-ul2's encoder (model card)
                       "qwen3vl": 1.72e9}  # Qwen3-VL-2B's language model, which Qwen3-VL-Embedding-2B keeps
TF32_FRACTION = 0.5  # TF32 dense peak / bf16 dense peak (A100, H100, H200, B200 data sheets)
TEXT_CACHE_SECONDS = 100e-3 / 32  # host time of one cached caption's lookup, in a loader worker (measured, issue 23)
COMPILE_SECONDS_PER_GRAPH = 30.0  # a block's forward + backward graph: assumed; gpu_check.sh measures it
# a block's forward-only graph: diffusers' regional compile of FLUX.1-dev's two block kinds, 9.6 s on an H100
# (PyTorch devlog "torch.compile and Diffusers: A Hands-On Guide to Peak Performance", 2026-05-11)
COMPILE_SECONDS_PER_INFERENCE_GRAPH = 9.6 / 2
# bytes/s per GPU, NVIDIA data sheets: HBM; NVLink one way (half the bidirectional figure)
HBM_BANDWIDTH = {"b200": 8.0e12, "h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12}
NVLINK_BANDWIDTH = {"b200": 900e9, "h200": 450e9, "h100": 450e9, "a100": 300e9}
INFINIBAND_BANDWIDTH = 50e9  # one 400 Gb/s NDR ConnectX-7 per GPU
GPUS_PER_NODE = 8
FP8_PEAK_RATIO = {"b200": 2.0, "h200": 2.0, "h100": 2.0}  # FP8 dense peak / bf16 dense peak; A100 has no FP8
FP8_EFFICIENCY = {"tensorwise": 0.65, "rowwise": 0.57}  # of the FP8 peak at the bf16 MFU (module docstring)
FP8_TERMS = ("qkv", "out", "text_kv", "mlp")  # `bench.flops` terms of the layers train.fp8 converts


@dataclass(frozen=True)
class Layout:
    """How a stage is spread over the GPUs and at what precision it talks and multiplies (module docstring)."""

    replicate: int = 1  # HSDP replicas; 1: FSDP over every GPU
    reduce_dtype: str = "fp32"
    fp8: str | bool = False
    keep_gathered: int = 1
    name: str = ""

    @classmethod
    def of(cls, cfg: Config, gpus: int, **changes) -> "Layout":
        t = cfg.train
        r = changes.pop("replicate", t.replicate)
        r = max(1, gpus // GPUS_PER_NODE) if r == "node" else r
        if gpus % r:
            raise UserError(f"train.replicate={r} does not divide {gpus} GPUs into equal replicas")
        base = dict(replicate=r, reduce_dtype=t.reduce_dtype, fp8=t.fp8, keep_gathered=t.keep_gathered_blocks)
        return cls(**{**base, **changes})

    def describe(self, gpus: int) -> str:
        shard = gpus // self.replicate
        parts = ["FSDP" if self.replicate == 1 else f"HSDP {self.replicate}×{shard}",
                 f"{self.reduce_dtype} reduce"] + ([f"FP8 {self.fp8}"] if self.fp8 else [])
        return ", ".join(parts)


# what --compare prices: each row adds one switch to the one before
COMPARE = [("FSDP", dict(replicate=1, reduce_dtype="fp32", fp8=False)),
           ("HSDP per node", dict(replicate="node", reduce_dtype="fp32", fp8=False)),
           ("+ bf16 reduce", dict(replicate="node", reduce_dtype="bf16", fp8=False)),
           ("+ FP8 tensorwise", dict(replicate="node", reduce_dtype="bf16", fp8="tensorwise"))]


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
    layout: str = ""  # `Layout.describe`
    compile_seconds: float = 0.0  # one-off compile warm-up, included in `hours`
    schedule: str = ""  # the learning-rate schedule, in words
    text_cache_workers: float = 0.0  # loader workers per GPU the text cache's lookup keeps busy


def activation_bytes(model: dict, batch: int, image_tokens: int, text_tokens: int, tokens: list[int] | None,
                     bytes_per_element: int, checkpointing: bool) -> float:
    """Saved activations of one micro batch (module docstring formula); `tokens`: image tokens per block."""
    d, m = model["hidden_size"], int(model["hidden_size"] * model["mlp_ratio"])
    ns = tokens if tokens is not None else [image_tokens] * model["depth"]
    full = [n * (18 * d + 4 * m) + 4 * text_tokens * d for n in ns]
    if checkpointing:
        return bytes_per_element * batch * (sum(n * d for n in ns) + max(full))
    return bytes_per_element * batch * sum(full)


def frozen_networks(cfg: Config, side: int, grid: int | None = None) -> dict[str, tuple[float, float]]:
    """{term: (FLOPs per training image, parameters)} of the enabled ingredients' frozen networks for an
    image of `side`² pixels whose token grid is `grid`² (default: the config's pixels per token)."""
    if grid is None:
        grid = side // (downscale_of(cfg.space) * model_kwargs(cfg)["patch_size"])
    return {term: cost for name in enabled(cfg)
            for term, cost in INGREDIENTS[name].frozen_networks(getattr(cfg, name), side, grid).items()}


def frozen_flops_per_image(cfg: Config, side: int, grid: int | None = None) -> dict[str, float]:
    """FLOPs of each of the recipe's frozen networks for one training image (module docstring)."""
    return {term: flops for term, (flops, _) in frozen_networks(cfg, side, grid).items()}


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
        text_rate = rate * (TF32_FRACTION if cfg.text.dtype == "fp32" else 1.0)
        out["text"] = per_gpu * 2 * TEXT_ENCODER_PARAMS[cfg.text.kind] * cfg.text.max_tokens / text_rate
    if eval_flops := eval_flops_per_step(cfg, model, gpus, side):
        out["eval"] = eval_flops / rate
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


def eval_flops_per_step(cfg: Config, model: dict, gpus: int, side: int) -> float:
    """One GPU's periodic-evaluation and sample-grid FLOPs, per training step (module docstring)."""
    n = (side // downscale_of(cfg.space) // model["patch_size"]) ** 2
    image = sum(forward_flops(model, 1, n, cfg.text.max_tokens).values())
    total = 0.0
    if cfg.eval.every > 0:
        forwards = len(GUIDANCE[cfg.eval.guidance or cfg.sample.guidance].branches)
        total += math.ceil(cfg.eval.num / gpus) * cfg.eval.steps * forwards * image / cfg.eval.every
    if cfg.train.sample_every > 0 and cfg.sample.prompts:
        forwards = len(GUIDANCE[cfg.sample.guidance].branches)
        total += math.ceil(len(cfg.sample.prompts) / gpus) * cfg.sample.steps * forwards * image / cfg.train.sample_every
    return total


def compile_graphs(cfg: Config, model: dict) -> int:
    """Training graphs regional compile builds for a stage: one per token count a block sees (module docstring)."""
    if cfg.train.compile is False:
        return 0
    pixels = downscale_of(cfg.space) * model["patch_size"]
    grids = {(h // pixels) * (w // pixels) for h, w in resolve_buckets(cfg.data.buckets, cfg.data.image_size, pixels)}
    return len({k for n in grids for k in block_tokens(cfg, n, model["depth"])})


def compile_seconds(cfg: Config, model: dict, gpus: int) -> float:
    """The stage's compile warm-up on the busiest rank: its training graphs and its inference ones."""
    if cfg.train.compile is False:
        return 0.0
    return (compile_graphs(cfg, model) * COMPILE_SECONDS_PER_GRAPH
            + len(inference_shapes(cfg, model, gpus)) * COMPILE_SECONDS_PER_INFERENCE_GRAPH)


def inference_shapes(cfg: Config, model: dict, gpus: int) -> set[tuple[int, int]]:
    """(batch, tokens) the blocks see in periodic eval's and the sample grids' forwards on one rank: its
    share of the images in chunks of `eval.batch_size` (a grid samples its share at once), the conditional
    and unconditional branches batched under CFG, the routed branch of self-guidance on its own."""
    n = (cfg.data.image_size // downscale_of(cfg.space) // model["patch_size"]) ** 2
    uses = []
    if cfg.eval.every > 0:
        share = math.ceil(cfg.eval.num / gpus)
        chunks = {min(cfg.eval.batch_size, share), share % cfg.eval.batch_size if share > cfg.eval.batch_size else 0}
        uses += [(b, cfg.eval.guidance or cfg.sample.guidance, cfg.eval.cfg) for b in chunks - {0}]
    if cfg.train.sample_every > 0 and cfg.sample.prompts:
        uses.append((math.ceil(len(cfg.sample.prompts) / gpus), cfg.sample.guidance, cfg.sample.cfg))
    shapes = set()
    for b, guidance, scale in uses:
        shapes.add(((2 if "cfg" in guidance and scale > 1 else 1) * b, n))
        if "self" in guidance:
            shapes |= {(b, k) for k in block_tokens(cfg, n, model["depth"])}
    return shapes


def frozen_bytes(cfg: Config) -> float:
    """Bytes of the resident frozen networks at the dtype they are loaded in (module docstring)."""
    return 4 * sum(params for _, params in frozen_networks(cfg, image_size(cfg)).values())


def text_encoder_bytes(cfg: Config) -> float:
    """Bytes of the frozen pretrained text encoder at `text.dtype` (bf16 unless fp32 is asked for)."""
    return TEXT_ENCODER_PARAMS.get(cfg.text.kind, 0.0) * (4 if cfg.text.dtype == "fp32" else 2)


def plan_stage(cfg: Config, gpus: int, gpu: str, price: float, mfu: float, layout: Layout | None = None) -> Stage:
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
    layout = layout or Layout.of(cfg, gpus)
    terms |= layout_seconds(cfg, model, gpus, gpu, mfu, model_flops, t.global_batch, n, routing, layout)
    exposed = {**terms, "fsdp": _exposed(terms)}  # prefetch hides the rest
    seconds = sum(exposed.values())
    warmup = compile_seconds(cfg, model, gpus)
    hours = (t.steps * seconds + warmup) / 3600
    p = parameter_count(model)
    p_muon = muon_parameters(model) if cfg.optim.name == "muon" else 0
    s = 4 if cfg.train.precision == "fp32" else 2
    act = dict(
        activations=activation_bytes(model, t.micro_batch, n, cfg.text.max_tokens, routing, s, False),
        activations_checkpointed=activation_bytes(model, t.micro_batch, n, cfg.text.max_tokens, routing, s, True),
    )
    shard = gpus // layout.replicate  # the sharded state is split over one replica's GPUs
    state = dict(weights=4 * p / shard, gradients=4 * p / shard, optimizer=(4 * p_muon + 8 * (p - p_muon)) / shard,
                 ema=4 * p / shard, frozen_networks=frozen_bytes(cfg), text_encoder=text_encoder_bytes(cfg),
                 gathered_blocks=2 * min(layout.keep_gathered, model["depth"]) * block_parameters(model))  # fmt: skip
    base = sum(state.values())
    limit = 0.9 * GPU_MEMORY[gpu]
    cached = cfg.text.kind in TEXT_ENCODER_PARAMS and cfg.text.cache_dir
    return Stage(cfg.run.name, t.steps, t.global_batch, t.micro_batch, n, flops, hours, hours * gpus * price,
                 {**state, **act}, base + act["activations"] <= limit, base + act["activations_checkpointed"] <= limit,
                 terms, seconds, max(exposed, key=exposed.get), t.global_batch / seconds,
                 layout=layout.describe(gpus), compile_seconds=warmup,
                 schedule=schedule_from_config(cfg.optim, t.steps).describe(),
                 text_cache_workers=t.global_batch / gpus / seconds * TEXT_CACHE_SECONDS if cached else 0.0)


def block_parameters(model: dict) -> int:
    """Parameters of one transformer block."""
    return (parameter_count(model) - parameter_count({**model, "depth": 0})) // model["depth"]


def fp8_parameters(model: dict) -> int:
    """Weights of the layers train.fp8 converts (q/k/v, out, text k/v, gate, up, down), all blocks."""
    d, m = model["hidden_size"], int(model["hidden_size"] * model["mlp_ratio"])
    return model["depth"] * (3 * d * d + d * d + 2 * d * d + 3 * d * m)


def layout_seconds(cfg: Config, model: dict, gpus: int, gpu: str, mfu: float, model_flops: float, batch: int,
                   image_tokens: int, routing: list[int] | None, layout: Layout) -> dict[str, float]:
    """The terms a layout changes (module docstring): model (FP8), fsdp (HSDP, reduce dtype, kept blocks), muon."""
    rate = GPU_PEAKS[gpu.upper()] * mfu
    out = {}
    fp8_p = 0
    if layout.fp8:
        if gpu not in FP8_PEAK_RATIO:
            raise UserError(f"train.fp8: {gpu.upper()} has no FP8 matmuls (compute capability < 8.9)")
        fwd = forward_flops(model, batch, image_tokens, cfg.text.max_tokens, routing)
        fast = 3 * sum(fwd[k] for k in FP8_TERMS)
        fp8_rate = rate * FP8_PEAK_RATIO[gpu] * FP8_EFFICIENCY[layout.fp8]
        out["model"] = (model_flops - fast) / gpus / rate + fast / gpus / fp8_rate
        fp8_p = fp8_parameters(model) if layout.fp8 == "tensorwise" else 0  # float8 all-gather
    p, n = parameter_count(model), layout.replicate
    shard = gpus // n
    gathered = 2 * (p - fp8_p) + fp8_p  # bytes of one all-gather of the weights
    kept = min(layout.keep_gathered, model["depth"]) * block_parameters(model) * gathered / p
    r = 2 if layout.reduce_dtype == "bf16" else 4
    out["fsdp"] = (2 * gathered - kept + r * p) * (shard - 1) / shard / interconnect_bandwidth(gpu, shard)
    if n > 1:
        out["fsdp"] += 2 * r * p / shard * (n - 1) / n / INFINIBAND_BANDWIDTH
        p_muon = muon_parameters(model) if cfg.optim.name == "muon" else 0
        out["adamw"] = 28 * (p - p_muon) / shard / HBM_BANDWIDTH[gpu]  # each replica updates its own shards
        if getattr(cfg.ema, "enabled", True):
            out["ema"] = 12 * p / shard / HBM_BANDWIDTH[gpu] / cfg.ema.every
        if cfg.optim.name == "muon":
            o, shapes = cfg.optim, muon_shapes(model)
            cost = muon_cost(shapes, gpus, o.muon_distributed, o.muon_ns_steps, 2 if o.muon_distributed else 4,
                             replicas=n)
            out["muon"] = (cost["flops"] / rate + cost["bytes"] / interconnect_bandwidth(gpu, shard)
                           + cost["remote_bytes"] / INFINIBAND_BANDWIDTH + 20 * muon_parameters(model) / shard / HBM_BANDWIDTH[gpu])
    return out


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
            f"{s.hours:.1f} h (compile warm-up {s.compile_seconds / 60:.0f} min), ${s.cost:,.0f}; "
            f"bottleneck: {s.bottleneck}",
            "  step/GPU    " + ", ".join(f"{k} {1e3 * v:.1f} ms ({100 * v / s.step_seconds:.1f} %)"
                                         for k, v in s.seconds.items() if k != "fsdp")
            + f", fsdp {1e3 * s.seconds['fsdp']:.1f} ms of which {1e3 * _exposed(s.seconds):.1f} ms exposed "
            f"({100 * _exposed(s.seconds) / s.step_seconds:.1f} %)",
            f"  layout      {s.layout}" + ("" if s.layout.startswith("FSDP") else
                                           ": all-gather and reduce-scatter inside a replica, all-reduce across"),
            f"  loader      {s.images_per_s:,.0f} images/s ({s.images_per_s / result['gpus']:,.0f} per GPU)"
            + (f"; the text cache's lookup keeps {s.text_cache_workers:.2f} of its workers busy per GPU"
               if s.text_cache_workers else ""),
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


def stage_json(stage: Stage) -> dict:
    """One stage as a JSON object: every term (as computed, and as exposed in the step), memory, totals."""
    out = dataclasses.asdict(stage)
    out["exposed_seconds"] = {**stage.seconds, "fsdp": _exposed(stage.seconds)}
    out["memory_total"] = sum(v for k, v in stage.memory.items() if k != "activations_checkpointed")
    out["memory_total_checkpointed"] = sum(v for k, v in stage.memory.items() if k != "activations")
    return out


def format_json(result: dict) -> str:
    """`daybreak plan --json`: one JSON object per line, each stage's, then the run's totals."""
    total = {k: result[k] for k in ("gpus", "gpu", "price", "mfu", "hours", "cost", "mfu_for_seed_hours")}
    return "\n".join([*(json.dumps(stage_json(s)) for s in result["stages"]), json.dumps({"total": total})])


def compare(configs: list[Config], gpus: int, gpu: str = "h200", price: float = 2.0, mfu: float = 0.4) -> list[dict]:
    """Every stage under each layout of `COMPARE`, then under the configs' own: what each switch buys."""
    gpu = gpu.lower()
    rows = []
    for name, changes in [*COMPARE, ("the configs' layout", {})]:
        stages = [plan_stage(c, gpus, gpu, price, mfu, Layout.of(c, gpus, **changes)) for c in configs]
        rows.append({"layout": name, "describe": stages[0].layout, "stages": stages,
                     "hours": sum(s.hours for s in stages), "cost": sum(s.cost for s in stages)})
    return rows


def format_compare(rows: list[dict], gpus: int, gpu: str, mfu: float) -> str:
    names = [s.name for s in rows[0]["stages"]]
    head = f"{'layout':<22}" + "".join(f"{n[:24]:>26}" for n in names) + f"{'total':>9}  bottlenecks"
    lines = [f"{gpus} × {gpu.upper()}, assumed MFU {100 * mfu:.0f} %: seconds a step and hours of each stage", head]
    for r in rows:
        cells = "".join(f"{s.step_seconds:>14.3f} s {s.hours:>7.2f} h" for s in r["stages"])
        lines.append(f"{r['layout']:<22}{cells}{r['hours']:>7.2f} h  " + ", ".join(s.bottleneck for s in r["stages"])
                     + (f"  ({r['describe']})" if r["layout"].startswith("the") else ""))
    return "\n".join(lines)
