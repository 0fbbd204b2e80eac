"""Distributed vs replicated Muon: the optimizer phase of `daybreak bench` at 1 and 2 ranks.

    flock /tmp/daybreak-cpu.lock env UV_NO_SYNC=1 uv run python benchmarks/muon_ranks.py [--repeats 2]

A Muon-dominated config (the tiny preset widened to hidden 256 / 8 heads, one 16 px image per rank:
the model step is small next to Newton-Schulz on 4 blocks' matrices), each rank one thread
(`OMP_NUM_THREADS=1`), under `torchrun`. The variants run alternately, `--repeats` rounds, and the
median of each variant's `phase_ms["optimizer"]` (the slowest rank's median step) is reported with
the planner's FLOPs and bytes for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIG = ["tiny", "model.hidden_size=256", "model.num_heads=8", "model.axes_dim=[16,16]", "data.image_size=16", "train.micro_batch=1",
          "ema.every=1"]
VARIANTS = [(1, True), (2, False), (2, True)]  # at 1 rank both paths are the same single-process Muon


def run(world: int, distributed: bool, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_port=29551",
           "-m", "daybreak", "bench", *CONFIG, f"optim.muon_distributed={str(distributed).lower()}",
           "--steps", str(steps), "--warmup", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    seen: dict[tuple[int, bool], list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(a.repeats):
        for v in VARIANTS:
            seen[v].append(run(*v, a.steps))
    print("this 2-core CPU, OMP_NUM_THREADS=1 per rank; median over "
          f"{a.repeats} alternating rounds of {a.steps} steps")
    print(f"{'ranks':>5} {'muon':>11} {'optimizer ms':>13} {'step ms':>9} {'NS GFLOP/rank':>14} {'MiB recv':>9}")
    medians = {}
    for (world, dist), rs in seen.items():
        opt = statistics.median(r["phase_ms"]["optimizer"] for r in rs)
        step = statistics.median(r["ms_per_step_median"] for r in rs)
        medians[(world, dist)] = opt
        print(f"{world:>5} {'distributed' if dist else 'replicated':>11} {opt:>13.1f} {step:>9.1f} "
              f"{rs[0]['optimizer_flops'] / 1e9:>14.2f} {rs[0]['optimizer_bytes'] / 2**20:>9.2f}")
    print(f"2 ranks, distributed / replicated optimizer phase: {medians[(2, True)] / medians[(2, False)]:.2f}x")


if __name__ == "__main__":
    main()
