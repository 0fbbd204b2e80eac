"""daybreak's default train step against the step a user would write around diffusers' model; with
`--compile`, daybreak's step with compiled blocks (inductor) too.

    flock /tmp/daybreak-cpu.lock env UV_NO_SYNC=1 uv run python benchmarks/train_step_vs_diffusers.py \
        [--repeats 7] [--compile]

Same model config as `compare_diffusers.py` (REFERENCE), 256 px, batch 4, 64 text tokens, fp32.
- daybreak: `daybreak bench`'s step (`BenchRun`: the real `Trainer.step_once`) with the defaults
  `daybreak train` uses (x-prediction flow loss, Muon + AdamW, clip 0.2, EMA every 10 steps);
- user: diffusers' `PRXTransformer2DModel`, eager forward, MSE, backward, `clip_grad_norm_`,
  `torch.optim.AdamW(foreach=True)`, EMA by `torch._foreach_lerp_` every step.
The variants take steps alternately, `--repeats` rounds after warm-up; medians are reported, and
each compiled graph (count from `parallel.compiled_graphs`) is built during warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import daybreak  # noqa: F401  (makes torchvision importable before diffusers)
import torch
from diffusers import PRXTransformer2DModel

from compare_diffusers import REFERENCE
from daybreak.bench.harness import BenchRun, SyntheticText
from daybreak.config import load_config
from daybreak.training import parallel

SIZE, BATCH, TEXT = 256, 4, 64


def daybreak_run(compile: bool) -> BenchRun:
    keys = ["in_channels", "patch_size", "hidden_size", "mlp_ratio", "num_heads", "depth", "bottleneck_size"]
    overrides = [f"model.{k}={REFERENCE[k]}" for k in keys] + [
        "model.axes_dim=[32, 32]", f"text.dim={REFERENCE['context_in_dim']}", f"text.max_tokens={TEXT}",
        f"data.image_size={SIZE}", f"train.micro_batch={BATCH}", f"train.compile={str(compile).lower()}",
        "ema.every=10", "ema.decay=0.999", "optim.warmup_steps=0"]
    return BenchRun(load_config("tiny", overrides))


def user_step():
    torch.manual_seed(0)
    model = PRXTransformer2DModel(**REFERENCE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    text = SyntheticText(REFERENCE["context_in_dim"], TEXT, BATCH, g)
    x0 = torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1

    def step():
        t = torch.rand(BATCH)
        noise = torch.randn_like(x0)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        opt.zero_grad(set_to_none=True)
        out = model(xt, t, text.emb, text.mask, return_dict=False)[0]
        torch.nn.functional.mse_loss(out, x0).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.999)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also daybreak with train.compile=true (inductor)")
    a = ap.parse_args()
    variants = {"user_diffusers": user_step(), "daybreak": daybreak_run(False).step}
    if a.compile:
        variants["daybreak_compiled"] = daybreak_run(True).step
    warm = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        warm[name] = time.perf_counter() - t0
    graphs = parallel.compiled_graphs()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"this 2-core CPU, {torch.get_num_threads()} threads; REFERENCE {REFERENCE}, {SIZE} px, "
          f"batch {BATCH}, {TEXT} text tokens, fp32; medians of {a.repeats} alternating steps")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<18} {1e3 * v:8.1f} ms/step   (3 warm-up steps {warm[k]:.1f} s)")
    print(f"  daybreak / user step: {med['daybreak'] / med['user_diffusers']:.3f}x")
    if a.compile:
        print(f"  compiled / eager daybreak: {med['daybreak_compiled'] / med['daybreak']:.3f}x; graphs built "
              f"{graphs}, after the timed steps {parallel.compiled_graphs()} (recompiles: "
              f"{parallel.compiled_graphs() - graphs})")


if __name__ == "__main__":
    main()
