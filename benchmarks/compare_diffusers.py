"""daybreak's transformer against diffusers' PRXTransformer2DModel: forward + backward time, one process.

    UV_NO_SYNC=1 uv run python benchmarks/compare_diffusers.py [--sizes 256 512] [--repeats 7]

Both models get the same weights and inputs (fp32, padded text mask). Each repeat times one
fwd+bwd of every variant in turn, plus a burst of square fp32 matmuls (the machine's practical
peak right now), so load from other processes hits all of them alike; medians are reported.
TREAD (50 % of the tokens routed over blocks 1..4 of 6) exists only in daybreak. Achieved FLOP/s
uses the analytic model FLOPs of `daybreak.bench.flops`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import daybreak  # noqa: F401  (makes torchvision importable before diffusers)
import torch
from diffusers import PRXTransformer2DModel

from daybreak.bench.flops import train_flops
from daybreak.bench.harness import SyntheticText, cpu_matmul_peak
from daybreak.model import PRXTransformer
from daybreak.recipe.tread import TreadRouter, span_tokens

REFERENCE = dict(in_channels=3, patch_size=16, context_in_dim=256, hidden_size=384, mlp_ratio=3.5, num_heads=6,
                 depth=6, axes_dim=[32, 32], bottleneck_size=64)  # fmt: skip
FRACTION, START, END = 0.5, 1, 4  # TREAD over blocks 1..4 of 6


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fwd_bwd(model, inputs, **kwargs):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(*inputs, **kwargs)
        (out[0] if isinstance(out, tuple) else out).pow(2).mean().backward()

    return run


def compare(size: int, batch: int, text_tokens: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    theirs = PRXTransformer2DModel(**REFERENCE).train()
    ours = PRXTransformer(**REFERENCE).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    text = SyntheticText(REFERENCE["context_in_dim"], text_tokens, batch, g)
    img = torch.randn(batch, 3, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    inputs = (img, t, text.emb, text.mask)
    variants = {
        "diffusers": fwd_bwd(theirs, inputs, return_dict=False),
        "daybreak": fwd_bwd(ours, inputs),
        "daybreak_tread": lambda: fwd_bwd(ours, inputs, hooks=[TreadRouter(FRACTION, START, END)])(),
        "matmul_peak": lambda: None,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks = []
    for _ in range(repeats):
        for name, fn in variants.items():
            if name == "matmul_peak":
                peaks.append(cpu_matmul_peak(0.5))
            else:
                times[name].append(timed(fn))
    n = (size // REFERENCE["patch_size"]) ** 2
    med = {k: statistics.median(v) for k, v in times.items() if v}
    peak = statistics.median(peaks)
    dense, routed = train_flops(REFERENCE, batch, n, text_tokens), train_flops(REFERENCE, batch, n, text_tokens,
                                                                          span_tokens(n, REFERENCE["depth"], FRACTION, START, END))
    return {
        "tokens": n, "peak_gflops": peak / 1e9,
        **{f"{k}_ms": 1e3 * v for k, v in med.items()},
        "diffusers_of_peak": dense / med["diffusers"] / peak, "daybreak_of_peak": dense / med["daybreak"] / peak,
        "daybreak_over_diffusers": med["daybreak"] / med["diffusers"],
        "tread_speedup": med["daybreak"] / med["daybreak_tread"], "tread_flop_ratio": dense / routed,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides (patch 16: 256, 1024 tokens)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(f"reference config {REFERENCE}, batch {a.batch}, {a.text_tokens} text tokens, fp32, "
          f"{torch.get_num_threads()} threads, {a.repeats} alternating repeats (medians)")
    for size in a.sizes:
        r = compare(size, a.batch, a.text_tokens, a.repeats)
        print(f"\n{size}x{size} px, {r['tokens']} image tokens; fp32 matmul peak {r['peak_gflops']:.1f} GFLOP/s")
        print(f"  diffusers fwd+bwd      {r['diffusers_ms']:8.1f} ms   {100 * r['diffusers_of_peak']:5.1f} % of peak")
        print(f"  daybreak  fwd+bwd      {r['daybreak_ms']:8.1f} ms   {100 * r['daybreak_of_peak']:5.1f} % of peak")
        print(f"  daybreak + TREAD 50 %  {r['daybreak_tread_ms']:8.1f} ms")
        print(f"  daybreak / diffusers   {r['daybreak_over_diffusers']:.3f}x time")
        print(f"  TREAD speed-up         {r['tread_speedup']:.2f}x (FLOP ratio {r['tread_flop_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
