"""Prompt adherence and patch seam of a demo checkpoint sampled with other settings.

    UV_NO_SYNC=1 uv run python benchmarks/demo_sampling.py runs/demo/final [--shifts 3 1] \
        [--guidance cfg none self cfg+self] [--seeds 4] [--steps 28]

Scores the same checkpoint (EMA weights, the 30 fixed prompts and seeds of `daybreak demo`) at each
sampling shift × guidance rule. `--seeds K` also draws each prompt from K - 1 more noise seeds
(K × 30 images; seed block k starts at 1000·k), so a shape rate is not read off 30 draws alone.
The demo anneals its training shift from 3 to 1 and samples at 1 (configs/demo.yaml says why);
self-guidance needs a checkpoint trained with token routing (TREAD or SPRINT).
"""

from __future__ import annotations

import argparse
import dataclasses

from daybreak.data.shapes import SHAPES_PROMPTS
from daybreak.diffusion.sampling import GUIDANCE
from daybreak.evaluate.adherence import adherence, patch_seam, rates
from daybreak.pipeline import load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--shifts", type=float, nargs="+", default=[3.0, 1.0])
    ap.add_argument("--guidance", nargs="+", default=["cfg"], choices=GUIDANCE)
    ap.add_argument("--seeds", type=int, default=1, help="noise seed blocks per prompt (the demo's is block 0)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    a = ap.parse_args()
    if a.seeds < 1:
        ap.error("--seeds must be at least 1")
    prompts = SHAPES_PROMPTS * a.seeds
    seeds = [1000 * k + i for k in range(a.seeds) for i in range(len(SHAPES_PROMPTS))]
    pipe = load_pipeline(a.checkpoint)
    for shift in a.shifts:
        pipe.cfg = dataclasses.replace(pipe.cfg, sample=dataclasses.replace(pipe.cfg.sample, shift=shift))
        for rule in a.guidance:
            images = pipe(prompts, seeds=seeds, steps=a.steps, guidance=rule)
            score, items = adherence(images, prompts)
            r = rates(items)
            print(f"shift {shift:g}, guidance {rule}, {len(images)} images: all three {score:.1%} "
                  f"(colour {r['color']:.0%}, shape {r['shape']:.0%}, position {r['position']:.0%}); patch seam "
                  f"{patch_seam(images, pipe.parts.pixels_per_token):.2f}")


if __name__ == "__main__":
    main()
