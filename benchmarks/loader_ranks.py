"""One rank's per-step loading work at world size 1 and 32, same global batch (1024), on MDS shards.

    flock /tmp/daybreak-cpu.lock env UV_NO_SYNC=1 uv run python benchmarks/loader_ranks.py [--root DIR]

Writes (once, under --root, default /tmp/daybreak-loader-bench) 2048 JPEGs of three aspect ratios
around 512 px with captions, converts them with `daybreak data convert --format mds`, then runs
`daybreak data bench mds ... --workers 0` (all of a rank's loading work in the timed main process)
as rank 0 of 1 (batch 1024) and rank 5 of 32 (batch 32). For comparison it times what a sampler
that probes the whole global batch on every rank would add to every step: probing all 1024 examples
(for MDS a probe reads the image's bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(512, 512), (640, 384), (384, 640)]


def make_data(root: Path, n: int = 2048) -> Path:
    folder, mds = root / "images", root / "mds"
    if (mds / "index.json").is_file():
        return mds
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % 3]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # smooth: a photo-like JPEG size
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.json").write_text(json.dumps({"short": f"image {i}", "long": f"a long caption {i}"}))
    subprocess.run([sys.executable, "-m", "daybreak", "data", "convert", str(folder), str(mds), "--format", "mds"],
                   check=True, capture_output=True)
    return mds


def bench(mds: Path, world: int, rank: int, seconds: float) -> dict:
    cmd = [sys.executable, "-m", "daybreak", "data", "bench", "mds", str(mds), "--workers", "0", "--batch",
           str(1024 // world), "--world-size", str(world), "--rank", str(rank), "--seconds", str(seconds)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/daybreak-loader-bench")
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    mds = make_data(Path(a.root))
    one, many = bench(mds, 1, 0, a.seconds), bench(mds, 32, 5, a.seconds)

    import daybreak  # noqa: F401
    from daybreak.data import open_source

    src = open_source("mds", str(mds))
    t0 = time.process_time()
    for i in range(1024):
        src.probe(i)
    probe_ms = 1e3 * (time.process_time() - t0)
    print("shared 2-core CPU (5 developers); MDS, 2048 JPEGs ~512 px, global batch 1024, --workers 0 "
          "(main-process CPU time per step)")
    for r in (one, many):
        print(f"  world {r['world_size']:>2} rank {r['rank']:>2} batch {r['batch']:>4}: {r['main_ms_per_step']:9.1f} ms/step "
              f"({r['steps']} steps, {r['images_per_s']} images/s)")
    print(f"  world 32 / world 1: {many['main_ms_per_step'] / one['main_ms_per_step']:.4f} (target <= 1/16 = 0.0625)")
    print(f"  probing the 1024 examples of one global batch (a whole-batch-probing sampler's per-step work on every rank): "
          f"{probe_ms:.1f} ms")


if __name__ == "__main__":
    main()
