"""Analytic FLOPs against PyTorch's counter, the planner's arithmetic, and the bench's report."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from daybreak.bench.flops import forward_flops, parameter_count, train_flops
from daybreak.bench.harness import SyntheticText, bench, gpu_peak
from daybreak.bench.plan import GPU_MEMORY, activation_bytes, muon_parameters, muon_shapes, plan, plan_stage
from daybreak.build import model_kwargs
from daybreak.optim import muon_cost, ns_flops
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model import PRXTransformer, preset
from daybreak.recipe.tread import TreadRouter, span_tokens

CFG = dict(in_channels=3, patch_size=4, context_in_dim=24, hidden_size=64, mlp_ratio=3.5, num_heads=2, depth=4,
           axes_dim=[16, 16], bottleneck_size=16)  # fmt: skip
ROUTING = (0.5, 1, 2)  # fraction, start, end: TREAD over blocks 1..2
FSDP = ["train.replicate=1", "train.fp8=false", "text.cache_dir=null"]  # the speedrun before its layout defaults


def counted(model, b, side, length, routing=None, backward=False) -> int:
    """FlopCounterMode's total. It counts mm/addmm/bmm; it has no formula for the CPU flash SDPA kernel
    (`_scaled_dot_product_flash_attention_for_cpu` counts 0), so attention runs on the math backend,
    whose QKᵀ and A·V are bmm calls the counter sees."""
    g = torch.Generator().manual_seed(0)
    img, t = torch.randn(b, 3, side, side, generator=g), torch.rand(b, generator=g)
    txt = torch.randn(b, length, CFG["context_in_dim"], generator=g)
    hooks = [TreadRouter(*routing)] if routing else []
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(img, t, txt, hooks=hooks)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("routing", [None, ROUTING], ids=["dense", "tread"])
def test_flops_match_the_counter(routing):
    model = PRXTransformer(**CFG)
    n = (16 // 4) ** 2
    tokens = span_tokens(n, CFG["depth"], *routing) if routing else None
    assert counted(model, 2, 16, 5, routing) == sum(forward_flops(CFG, 2, n, 5, tokens).values())
    assert counted(model, 2, 16, 5, routing, backward=True) == train_flops(CFG, 2, n, 5, tokens)


def test_routing_discount_and_parameter_count():
    dense, routed = forward_flops(CFG, 2, 16, 5), forward_flops(CFG, 2, 16, 5, span_tokens(16, 4, *ROUTING))
    assert routed["text_kv"] == dense["text_kv"] and routed["modulation"] == dense["modulation"]
    assert routed["mlp"] == dense["mlp"] * (2 * 16 + 2 * 8) / (4 * 16)  # 2 blocks on 16 tokens, 2 on 8
    for kwargs in (CFG, dict(CFG, bottleneck_size=None), preset("prx-small"), dict(preset("demo"), resolution_embeds=True)):
        with torch.device("meta"):
            assert parameter_count(kwargs) == sum(p.numel() for p in PRXTransformer(**kwargs).parameters())


def test_activation_formula_matches_saved_tensors():
    """The planner's 18·d + 4·m elements per token and block, against what autograd actually saves."""
    cfg = dict(CFG, depth=2)
    model = PRXTransformer(**cfg)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 8, 24, generator=g)
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.blocks[0].register_forward_pre_hook(lambda m, a: storages.clear())  # from the blocks on
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(img, torch.rand(2), txt)
    saved = sum(v for k, v in storages.items() if k not in params)
    assert saved == pytest.approx(activation_bytes(cfg, 2, 64, 8, None, 4, checkpointing=False), rel=0.1)


def test_planner_memory_by_hand():
    cfg = load_config("tiny", ["train.global_batch=8", "train.micro_batch=4", "optim.name=muon"])
    stage = plan_stage(cfg, gpus=2, gpu="h100", price=3.0, mfu=0.5)
    p, model = 408_208, preset("tiny") | {"context_in_dim": 32}
    assert parameter_count(model) == p
    muon = muon_parameters(model)
    assert muon == 4 * (64 * 192 + 64 * 64 + 64 * 128 + 3 * 64 * 224 + 64 * 384)  # qkv, out, text kv, MLP, modulation
    m = stage.memory
    assert m["weights"] == m["gradients"] == m["ema"] == 4 * p / 2
    assert m["optimizer"] == (4 * muon + 8 * (p - muon)) / 2  # Muon 1 buffer, AdamW 2
    # 4 blocks × 64 tokens (32 px, patch 4), 16 text tokens, d 64, m 224, bf16 (precision auto -> 2 bytes)
    per_block = 64 * (18 * 64 + 4 * 224) + 4 * 16 * 64
    assert m["activations"] == 2 * 4 * 4 * per_block
    assert m["activations_checkpointed"] == 2 * 4 * (4 * 64 * 64 + per_block)
    assert m["text_encoder"] == 0 and m["frozen_networks"] == 0  # demo text tower (trained), no teachers
    # compile on (the default on CUDA): one square bucket, no routing -> 1 graph of 30 s
    assert stage.compile_seconds == 30
    assert stage.hours == pytest.approx((20 * stage.step_seconds + 30) / 3600)
    assert stage.cost == pytest.approx(stage.hours * 2 * 3.0)
    # the step's terms by hand: 2 H100 in one node (NVLink 450 GB/s one way, HBM 3.35 TB/s), rate 989e12 × 0.5
    sec, rate = stage.seconds, 989e12 * 0.5
    assert sec["model"] == pytest.approx(stage.flops_per_step / 2 / rate)  # tiny: no frozen networks, demo text
    assert sec["adamw"] == pytest.approx(28 * (p - muon) / 2 / 3.35e12)
    assert sec["ema"] == pytest.approx(12 * p / 2 / 3.35e12)  # tiny: ema.every=1
    block = (p - parameter_count({**model, "depth": 0})) // 4
    assert sec["fsdp"] == pytest.approx((8 * p - 2 * block) * (1 / 2) / 450e9)  # the last block is not re-gathered
    assert m["gathered_blocks"] == 2 * block
    ns = muon_cost(muon_shapes(model), 2, True)
    assert sec["muon"] == pytest.approx(ns["flops"] / rate + ns["bytes"] / 2 / 450e9 + 20 * muon / 2 / 3.35e12)
    assert set(sec) == {"model", "muon", "adamw", "ema", "fsdp"}
    exposed = max(0.0, sec["fsdp"] - sec["model"])
    assert stage.step_seconds == pytest.approx(sum(sec.values()) - sec["fsdp"] + exposed)
    assert stage.images_per_s == pytest.approx(8 / stage.step_seconds)
    assert stage.bottleneck == max({**sec, "fsdp": exposed}.items(), key=lambda kv: kv[1])[0]
    adamw = plan_stage(load_config("tiny", ["optim.name=adamw"]), 1, "h100", 3.0, 0.5)
    assert adamw.memory["optimizer"] == 8 * p


def test_speedrun_plan_against_the_seed():
    stages = [load_config("speedrun-512"), load_config("speedrun-1024")]
    r = plan(stages, gpus=32, gpu="H200", price=2.0)
    assert [s.name for s in r["stages"]] == ["speedrun-512", "speedrun-1024"]
    assert r["seed"]["cost"] == 32 * 24 * 2.0
    assert r["cost"] == pytest.approx(r["hours"] * 32 * 2.0)
    assert all(s.fits for s in r["stages"])
    assert r["stages"][1].image_tokens == 1024 and r["stages"][0].image_tokens == 256
    # half the MFU, twice the compute terms; the MFU that gives the seed's 24 h gives 24 h
    half = plan(stages, gpus=32, mfu=0.2)["stages"][0].seconds
    assert half["model"] == pytest.approx(2 * r["stages"][0].seconds["model"])
    assert half["adamw"] == r["stages"][0].seconds["adamw"]
    assert plan(stages, gpus=32, mfu=r["mfu_for_seed_hours"])["hours"] == pytest.approx(24, rel=1e-4)
    huge = plan([load_config("speedrun-1024", ["train.micro_batch=512"])], gpus=1, gpu="h100")["stages"][0]
    assert not huge.fits and not huge.fits_checkpointed
    total = sum(v for k, v in huge.memory.items() if k != "activations_checkpointed")
    assert total > 0.9 * GPU_MEMORY["h100"]
    with pytest.raises(UserError, match="--gpu"):
        plan(stages, gpus=32, gpu="tpu")
    with pytest.raises(UserError, match="multiple"):
        plan(stages, gpus=3)


def test_speedrun_step_terms_by_hand():
    """Stage 1 on 32 H200 (4 nodes: InfiniBand 50 GB/s per GPU), 1024 images, 32 per GPU, MFU 0.4; FSDP over
    every GPU, bf16 matmuls, text encoded in the step (the speedrun's own layout: test_plan_layouts.py)."""
    cfg = load_config("speedrun-512", FSDP)
    stage, rate = plan_stage(cfg, 32, "h200", 2.0, 0.4), 989e12 * 0.4
    sec, p = stage.seconds, parameter_count(model_kwargs(cfg))
    # T5-Gemma's 2 B encoder on 32 captions of 256 tokens, 2·params·tokens each
    assert sec["text"] == pytest.approx(32 * 2 * 2e9 * 256 / rate)
    assert "text" not in plan_stage(load_config("speedrun-512", ["text.cache_dir=cache"]), 32, "h200", 2.0, 0.4).seconds
    # DINOv3 ViT-L/16 fed the 16×16 token grid × 16 px = 256 px: 256 patches + CLS + 4 registers, forward only
    assert sec["repa_teacher"] == pytest.approx(32 * 2 * 304e6 * 261 / rate)
    # DINOv2-reg ViT-B/14 at 224: 256 patches + CLS + 4 registers, 3 forwards' worth
    assert sec["dino_loss"] == pytest.approx(32 * 3 * 2 * 86e6 * 261 / rate)
    block = (p - parameter_count({**model_kwargs(cfg), "depth": 0})) // 16
    assert sec["fsdp"] == pytest.approx((8 * p - 2 * block) * 31 / 32 / 50e9)
    assert sec["ema"] == pytest.approx(12 * p / 32 / 4.8e12 / 10)  # every 10 steps
    assert sec["muon"] / stage.step_seconds <= 0.05  # distributed: the target of the issue
    replicated = plan_stage(load_config("speedrun-512", [*FSDP, "optim.muon_distributed=false"]), 32, "h200", 2.0, 0.4)
    shapes = muon_shapes(model_kwargs(cfg))
    assert len(shapes) == 16 * 7  # qkv, out, text k/v, gate, up, down, modulation per block
    full = sum(ns_flops(m, n) for m, n in shapes)
    assert full == pytest.approx(47.9e12, rel=0.01)  # the figure
    assert replicated.seconds["muon"] > full / rate  # every rank does all of it (plus the gather)
    assert stage.images_per_s == pytest.approx(1024 / stage.step_seconds)


def test_planner_terms_added_for_the_gpu_path_by_hand():
    """Text at `text.dtype`, the cache's lookup in the loader's workers, periodic eval and grids, compile
    warm-up, resident text encoder: each against its hand-worked value (stage 1 on 32 H200, MFU 0.4)."""
    rate = 989e12 * 0.4
    base = plan_stage(load_config("speedrun-512", ["text.cache_dir=null"]), 32, "h200", 2.0, 0.4)
    fp32 = plan_stage(load_config("speedrun-512", ["text.cache_dir=null", "text.dtype=fp32"]), 32, "h200", 2.0, 0.4)
    assert fp32.seconds["text"] == pytest.approx(32 * 2 * 2e9 * 256 / (rate / 2))  # TF32: half the bf16 peak
    assert base.memory["text_encoder"] == 2e9 * 2 and fp32.memory["text_encoder"] == 2e9 * 4
    assert base.memory["frozen_networks"] == 4 * (304e6 + 86e6 + 14.7e6)  # DINOv3-L, DINOv2-B, LPIPS VGG: fp32
    cached = plan_stage(load_config("speedrun-512", ["text.cache_dir=cache"]), 32, "h200", 2.0, 0.4)
    # the lookup runs in the loader's workers: the step loses the text term and gains nothing
    assert "text" not in cached.seconds and "text_cache" not in cached.seconds
    assert cached.step_seconds == pytest.approx(base.step_seconds - base.seconds["text"])
    # the workers read 32 captions a GPU a step, 3.125 ms each: that many seconds of a worker per step
    assert cached.text_cache_workers == pytest.approx(32 * 100e-3 / 32 / cached.step_seconds)
    assert base.text_cache_workers == 0
    assert cached.memory["text_encoder"] == 2e9 * 2  # the cache wraps the loaded encoder
    # eval every 5000 steps: ⌈1000 / 32⌉ = 32 images × 50 steps × 2 forwards (self-guidance); grids every
    # 5000: ⌈2 / 32⌉ = 1 image × 28 steps × 2; one 512 px image's forward (256 tokens, 256 text tokens)
    image = sum(forward_flops(model_kwargs(load_config("speedrun-512")), 1, 256, 256).values())
    assert base.seconds["eval"] == pytest.approx((32 * 50 * 2 + 1 * 28 * 2) * image / 5000 / rate)
    assert "eval" not in plan_stage(load_config("speedrun-512", ["eval.every=0", "train.sample_every=0"]),
                                    32, "h200", 2.0, 0.4).seconds
    # compile: one graph per token count a block sees, 30 s each. The 13 aspect buckets at 512 px (32 px
    # tokens) have 6 token counts (a bucket and its transpose share one); TREAD's span keeps n − round(n/2)
    from daybreak.data.buckets import make_buckets

    dense = {(h // 32) * (w // 32) for h, w in make_buckets(512, 32)}
    assert len(make_buckets(512, 32)) == 13 and dense == {240, 242, 247, 252, 255, 256}
    training = 6 + len({120, 121, 123, 126, 127, 128})
    # and, without autograd, the inference forwards: eval's ⌈1000 / 32⌉ = 32 images a rank in one chunk of
    # eval.batch_size 32, self-guided: (32, 256) dense, (32, 128) in the routed span; the grid's ⌈2 / 32⌉ = 1
    # prompt a rank: (1, 256), (1, 128). Under CFG (scale 3.5 > 1) cond and uncond batch: (64, 256) only
    # (30 s a training graph, 4.8 s a forward-only one)
    assert base.compile_seconds == pytest.approx(30 * training + 4.8 * 4)
    cfg = plan_stage(load_config("speedrun-512", ["eval.guidance=cfg"]), 32, "h200", 2.0, 0.4)
    assert cfg.compile_seconds == pytest.approx(30 * training + 4.8 * (1 + 2))
    quiet = plan_stage(load_config("speedrun-512", ["eval.every=0", "train.sample_every=0"]), 32, "h200", 2.0, 0.4)
    assert quiet.compile_seconds == 30 * training
    off = plan_stage(load_config("speedrun-512", ["train.compile=false"]), 32, "h200", 2.0, 0.4)
    assert off.compile_seconds == 0
    assert base.hours == pytest.approx((100_000 * base.step_seconds + base.compile_seconds) / 3600)


def test_bench_reports_the_contract_keys():
    cfg = load_config("tiny", ["tread.enabled=true", "tread.start=1", "tread.end=2", "train.micro_batch=2",
                               "train.global_batch=2"])  # fmt: skip
    r = bench(cfg, steps=1, warmup=1)
    for key in ("ms_per_step", "images_per_s", "tokens_per_s", "flops_per_step", "achieved_flops", "peak_flops",
                "mfu", "mfu_forward_backward", "peak_memory_gib"):
        assert r[key] > 0, key
    assert r["ingredients"] == ["tread"] and r["image_tokens"] == 64
    tokens = span_tokens(64, preset("tiny")["depth"], 0.5, 1, 2)
    assert r["block_tokens"] == tokens
    assert r["flops_per_step"] == train_flops(preset("tiny") | {"context_in_dim": 32}, 2, 64, 16, tokens)
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
    assert list(r["phase_ms"]) == ["data", "text", "forward", "backward", "optimizer", "ema"]
    assert all(r["phase_ms"][k] > 0 for k in ("forward", "backward", "optimizer", "ema"))
    shapes = muon_shapes(preset("tiny") | {"context_in_dim": 32})
    assert r["optimizer_flops"] == sum(ns_flops(m, n, gram=True) for m, n in shapes) and r["optimizer_bytes"] == 0
    assert r["world_size"] == 1 and r["compile"] is False and r["recompiles_timed"] == 0  # CPU default: eager


def test_synthetic_text_is_padded_and_gpu_peaks():
    text = SyntheticText(8, 16, 4, torch.Generator().manual_seed(0))
    emb, mask = text.encode(["a"] * 3)
    assert emb.shape == (3, 16, 8) and mask[0].all() and not mask[2].all() and mask[:, 0].all()
    assert gpu_peak("NVIDIA H200") == ("H200", 989e12) and gpu_peak("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert gpu_peak("Tesla T4") is None
