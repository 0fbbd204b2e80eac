"""The checks of `scripts/gpu_check.sh` that no `daybreak` command makes, one JSON file each.

`python -m daybreak.bench.gpu_check CHECK OUT.json [--dry-run]`, CHECK one of:
- `attention`: which kernel SDPA runs for PRX small's attention (image queries, text + image keys,
  a text padding mask) at 512 and 1024 px, in bf16 (fp32 on the CPU dry run), read from the profiler;
- `syncs`: host-device syncs per training step of PRX small at 512 px (TREAD on, flow loss),
  counted by `SyncCounter` (daybreak's own calls) and, on CUDA, by `torch.cuda.set_sync_debug_mode`
  (every synchronising CUDA call, torch's included);
- `fsdp`: one-rank FSDP2 (NCCL; gloo on the dry run) bf16 training steps, compile off and on: the
  loss is finite, the timestep reaching the model is fp32, the weights move.
`--dry-run` runs the same code on the CPU at tiny sizes. `merge DIR` gathers DIR's JSON files into
DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {512: (256, 32), 1024: (1024, 16)}  # side -> (image tokens of PRX small: 32 px a token, micro batch)


def _device(dry: bool) -> torch.device:
    return torch.device("cpu") if dry else torch.device("cuda", 0)


def attention(dry: bool) -> dict:
    """The SDPA kernel of each shape, as the profiler names it (flash, efficient, cudnn or math)."""
    from torch.profiler import ProfilerActivity, profile

    dev = _device(dry)
    heads, head_dim, text = (2, 16, 8) if dry else (28, 64, 256)
    dtype = torch.float32 if dry else torch.bfloat16
    out = {}
    for side, (tokens, batch) in SHAPES.items():
        n, batch = (tokens // 16, 1) if dry else (tokens, batch)
        q = torch.randn(batch, heads, n, head_dim, device=dev, dtype=dtype)
        k = torch.randn(batch, heads, text + n, head_dim, device=dev, dtype=dtype)
        mask = torch.ones(batch, 1, 1, text + n, dtype=torch.bool, device=dev)
        mask[:, :, :, text // 2: text] = False  # padded captions
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        picked = sorted({nm for nm in names if "scaled_dot_product" in nm or "attention" in nm.lower()
                         or "fmha" in nm.lower() or "flash" in nm.lower()})
        out[f"{side}px"] = {"tokens": n, "text": text, "kernels": picked,
                            "backend": next((b for b in ("cudnn", "flash", "efficient", "math")
                                             if any(b in nm.lower() for nm in picked)), "unknown")}
    return out


def syncs(dry: bool) -> dict:
    """Syncs per step after two warm-up steps, averaged over three."""
    from daybreak.bench.harness import BenchRun
    from daybreak.bench.syncs import SyncCounter
    from daybreak.config import load_config
    from daybreak.recipe import INGREDIENTS, enabled

    overrides = (["data.image_size=16", "train.micro_batch=2", "train.compile=false", "text.kind=demo",
                  "model.preset=tiny", "model.depth=13", "train.fp8_emulate=true"] if dry else
                 ["data.image_size=512", "train.micro_batch=8"])
    base = load_config("speedrun-512")  # without the ingredients whose pretrained networks need downloads
    frozen = [f"{n}.enabled=false" for n in enabled(base) if INGREDIENTS[n].pretrained(getattr(base, n))]
    cfg = load_config("speedrun-512", [*frozen, *overrides])
    run = BenchRun(cfg)
    for _ in range(2):
        run.step()
    counter, cuda_syncs, steps = SyncCounter(), 0, 3
    with counter, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not dry:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                run.step()
        finally:
            if not dry:
                torch.cuda.set_sync_debug_mode(0)
        cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"steps": steps, "daybreak_syncs_per_step": counter.count / steps, "sites": dict(counter.sites),
            "cuda_syncs_per_step": None if dry else cuda_syncs / steps,
            "cuda_sync_warnings": sorted({str(w.message).splitlines()[0] for w in caught})[:10]}


def fsdp(dry: bool) -> dict:
    """One rank, FSDP2 with bf16 compute weights under bf16 autocast, compile off then on."""
    import torch.distributed as dist

    import daybreak.model.transformer as transformer_module
    from daybreak.model import build_transformer, preset
    from daybreak.training import parallel

    dev = _device(dry)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo" if dry else "nccl", rank=0, world_size=1,
                            device_id=None if dry else dev)
    seen: list[str] = []
    original = transformer_module.timestep_embedding

    def record(t, *a, **k):
        seen.append(str(t.dtype))
        return original(t, *a, **k)

    transformer_module.timestep_embedding = record
    out = {}
    try:
        for compiled in (False, True):
            torch.manual_seed(0)
            kwargs = dict(preset("tiny" if dry else "prx-small"), context_in_dim=32 if dry else 2304)
            model = build_transformer(**kwargs).to(dev)
            if compiled:
                parallel.compile_blocks(model, backend="aot_eager" if dry else "inductor")
            parallel.shard_model(model, param_dtype=torch.bfloat16)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            side, b = (16, 2) if dry else (512, 4)
            x = torch.randn(b, 3, side, side, device=dev)
            txt = torch.randn(b, 8 if dry else 256, kwargs["context_in_dim"], device=dev)
            before = [parallel.local(p).detach().clone() for p in model.parameters()]
            seen.clear()
            t0 = time.perf_counter()
            losses = []
            for _ in range(3):
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = (model(x, torch.rand(b, device=dev), txt).float() - x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            moved = max((parallel.local(p).detach() - q).abs().max().item() for p, q in zip(model.parameters(), before))
            out[f"compile_{str(compiled).lower()}"] = {
                "losses": losses, "finite": all(math.isfinite(v) for v in losses),
                "timestep_dtypes": sorted(set(seen)), "weights_moved": moved, "seconds": time.perf_counter() - t0}
    finally:
        transformer_module.timestep_embedding = original
        dist.destroy_process_group()
    ok = all(r["finite"] and r["timestep_dtypes"] == ["torch.float32"] and r["weights_moved"] > 0 for r in out.values())
    return {**out, "ok": ok}


def merge(folder: Path) -> dict:
    """DIR/*.json (each check's figures) and DIR/steps.jsonl (the script's step results) as one dict,
    written to DIR/gpu_check.json."""
    merged = {}
    for path in sorted(folder.glob("*.json")):
        if path.name != "gpu_check.json":
            try:
                merged[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError:
                merged[path.stem] = {"unreadable": path.read_text()[-2000:]}
    steps = folder / "steps.jsonl"
    if steps.is_file():
        merged["steps"] = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
    (folder / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))
    return merged


CHECKS = {"attention": attention, "syncs": syncs, "fsdp": fsdp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daybreak.bench.gpu_check")
    p.add_argument("check", choices=[*CHECKS, "merge"])
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.check == "merge":
        merge(Path(a.out))
        return 0
    result = CHECKS[a.check](a.dry_run)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, default=str)[:2000])
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
