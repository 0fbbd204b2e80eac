"""Time to the first batch on a synthetic MDS of 200 k samples with `width`/`height` columns.

    flock /tmp/daybreak-cpu.lock env UV_NO_SYNC=1 uv run python benchmarks/loader_startup.py [--root DIR]

Writes once, under --root (default /tmp/daybreak-startup-bench), an MDS folder of N samples
(`key`, `image` (JPEG), `width`, `height`, `caption`; three aspect ratios, small JPEGs so the
folder stays ~0.3 GB), then runs `daybreak data bench mds DIR --workers 0 --seconds 0` (global
batch 1024) as: rank 0 of 1 with no metadata table kept yet (it builds and keeps it, as rank 0
of a run does), rank 0 of 1 again (a restart), rank 5 of 32 (the table is there), each in a fresh
process. Each line gives the time from opening the source to the first batch (Python's imports
not included). Run with PYTHONPATH set to an older checkout's `src` it measures that code the
same way ("before").
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(64, 64), (80, 48), (48, 80)]


def make_data(root: Path, n: int) -> Path:
    import daybreak  # noqa: F401  (torchvision fix before `streaming` imports it)
    from streaming import MDSWriter

    mds = root / f"mds-{n}"
    if (mds / "index.json").is_file():
        return mds
    rng = np.random.default_rng(0)
    jpegs = []
    for k in range(12):
        w, h = SIZES[k % 3]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(buf, "JPEG")
        jpegs.append((w, h, buf.getvalue()))
    columns = {"key": "str", "image": "jpeg", "width": "int", "height": "int", "caption": "str"}
    with MDSWriter(out=str(mds), columns=columns, size_limit=1 << 27) as sink:
        for i in range(n):
            w, h, data = jpegs[i % len(jpegs)]
            sink.write({"key": f"{i:07d}", "image": data, "width": w, "height": h, "caption": f"image number {i}"})
    return mds


def one(mds: Path, world: int, rank: int) -> dict:
    """The loader `daybreak data bench mds DIR --workers 0 --resolution 64 --batch 1024/W --world-size W
    --rank R` builds, timed from opening the source to its first batch (Python's imports excluded)."""
    from daybreak.data import BucketLoader, CaptionMixer, open_source, resolve_buckets

    start = time.perf_counter()
    loader = BucketLoader(open_source("mds", str(mds)), batch_size=1024 // world,
                          buckets=resolve_buckets("aspect", 64, 32), caption_mixer=CaptionMixer(), num_workers=0,
                          rank=rank, world_size=world)
    batch = next(iter(loader))
    return {"call_s": round(time.perf_counter() - start, 3), "images": len(batch["keys"])}


def bench(mds: Path, world: int, rank: int) -> dict:
    cmd = [sys.executable, __file__, "--one", str(mds), str(world), str(rank)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/daybreak-startup-bench")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--one", nargs=3, metavar=("DIR", "WORLD", "RANK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(Path(a.one[0]), int(a.one[1]), int(a.one[2]))))
        return
    t = time.perf_counter()
    mds = make_data(Path(a.root), a.samples)
    print(f"data: {mds} ({a.samples} samples, written in {time.perf_counter() - t:.0f} s or found)")
    shutil.rmtree(mds / ".daybreak-meta", ignore_errors=True)
    for label, world, rank in (("first start", 1, 0), ("restart", 1, 0), ("rank 5 of 32", 32, 5)):
        r = bench(mds, world, rank)
        print(f"  {label:>13}: world {world:>2} rank {rank}: open + first batch of {r['images']} images: "
              f"{r['call_s']} s")


if __name__ == "__main__":
    main()
