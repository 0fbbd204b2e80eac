"""`daybreak demo`: the whole loop on a CPU in minutes, with no downloads.

Trains `configs/demo.yaml` on the synthetic shapes (`data/shapes.py`) for its fixed number of steps
(so the result does not depend on how fast or busy the machine is; `--minutes M` scales the steps
by M / `DEMO_MINUTES`), samples the fixed evaluation prompts with the EMA weights, and scores prompt
adherence (colour, shape and position: `evaluate.adherence`) and the patch seam of the samples
against the training images'.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daybreak.config import load_config
from daybreak.data.shapes import SHAPES_PROMPTS, ShapesDataset, parse_prompt
from daybreak.errors import UserError
from daybreak.evaluate.adherence import adherence, patch_seam, rates
from daybreak.images import image_grid
from daybreak.pipeline import load_pipeline
from daybreak.run import train


# about what configs/demo.yaml's 1200 steps take on 2 idle CPU cores (7.1 min of training, 7.8 min in
# all, measured; 8.0 and 8.4 on a slower 2-core machine); `--minutes M` trains round(1200 · M / DEMO_MINUTES) steps
DEMO_MINUTES = 7.0


def score_checkpoint(ckpt: Path, out_dir: Path, seed: int = 0) -> dict:
    """Sample SHAPES_PROMPTS with fixed seeds, judge them, write grid + JSON; returns the summary."""
    pipe = load_pipeline(ckpt)
    images = pipe(SHAPES_PROMPTS, seed=seed)
    score, items = adherence(images, SHAPES_PROMPTS)
    patch = pipe.parts.pixels_per_token
    data = ShapesDataset(size=pipe.cfg.data.image_size, seed=pipe.cfg.seed + 1)
    seams = {"samples": patch_seam(images, patch), "training_images": patch_seam([data[i]["image"] for i in range(300)], patch)}
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / "demo_grid.png"
    labels = [" ".join(parse_prompt(p)[i] for i in (0, 1, 2)) for p in SHAPES_PROMPTS]  # "red circle left"
    image_grid(images, cols=8, captions=labels).save(grid)
    result = {"adherence": score, **{f"adherence_{k}": v for k, v in rates(items).items() if k != "all"},
              "patch_seam": seams, "prompts": len(SHAPES_PROMPTS), "grid": str(grid), "items": items}
    (out_dir / "adherence.json").write_text(json.dumps(result, indent=2))
    return result


def run_demo(out: str = "runs/demo", minutes: float | None = None, overrides: list[str] = (),
             allow_changed: list[str] = ()) -> dict:
    """Train the demo (its fixed steps, or scaled to `minutes` on the reference machine), then score it."""
    t0 = time.perf_counter()
    cfg = load_config("demo", [f"run.dir={out}", *overrides])
    if minutes is not None:
        if minutes <= 0:
            raise UserError(f"--minutes must be positive, got {minutes:g}")
        steps = max(1, round(cfg.train.steps * minutes / DEMO_MINUTES))
        cfg = load_config("demo", [f"run.dir={out}", f"train.steps={steps}", *overrides])
    final = train(cfg, allow_changed=allow_changed)
    result = score_checkpoint(final, Path(out) / "samples")
    minutes_taken = (time.perf_counter() - t0) / 60
    seam = result["patch_seam"]
    print(f"\ndemo finished in {minutes_taken:.1f} min ({cfg.train.steps} steps of {cfg.train.global_batch} images)")
    print(f"  checkpoint:        {final}")
    print(f"  sample grid:       {result['grid']}")
    print(f"  loss plot:         {Path(out) / 'loss.png'}")
    print(f"  prompt adherence:  {result['adherence']:.1%} on {result['prompts']} prompts (colour, shape and position "
          f"all right; colour {result['adherence_color']:.0%}, shape {result['adherence_shape']:.0%}, "
          f"position {result['adherence_position']:.0%})")
    print(f"  patch seam:        {seam['samples']:.2f} (training images {seam['training_images']:.2f}; "
          "border ÷ inside pixel differences, 1 or more is a visible grid)")
    return result
