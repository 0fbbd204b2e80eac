"""`daybreak demo`: the whole loop on a CPU in minutes, with no downloads.

Trains `configs/demo.yaml` on the synthetic shapes (`data/shapes.py`), samples the fixed evaluation prompts
with the EMA weights, and scores prompt adherence: the share of images whose dominant colour and
its position match the prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daybreak.config import load_config
from daybreak.data.shapes import SHAPES_PROMPTS, parse_prompt
from daybreak.evaluate.adherence import adherence
from daybreak.images import image_grid
from daybreak.pipeline import load_pipeline
from daybreak.run import train


def score_checkpoint(ckpt: Path, out_dir: Path, seed: int = 0) -> dict:
    """Sample SHAPES_PROMPTS with fixed seeds, judge them, write grid + JSON; returns the summary."""
    pipe = load_pipeline(ckpt)
    images = pipe(SHAPES_PROMPTS, seed=seed)
    score, items = adherence(images, SHAPES_PROMPTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / "demo_grid.png"
    labels = [" ".join(parse_prompt(p)[i] for i in (0, 1, 2)) for p in SHAPES_PROMPTS]  # "red circle left"
    image_grid(images, cols=8, captions=labels).save(grid)
    result = {"adherence": score, "prompts": len(SHAPES_PROMPTS), "grid": str(grid), "items": items}
    (out_dir / "adherence.json").write_text(json.dumps(result, indent=2))
    return result


def run_demo(out: str = "runs/demo", minutes: float | None = None, overrides: list[str] = ()) -> dict:
    t0 = time.perf_counter()
    extra = [f"run.dir={out}"] + ([f"train.time_limit_minutes={minutes}"] if minutes else [])
    cfg = load_config("demo", [*extra, *overrides])
    final = train(cfg)
    result = score_checkpoint(final, Path(out) / "samples")
    minutes_taken = (time.perf_counter() - t0) / 60
    print(f"\ndemo finished in {minutes_taken:.1f} min")
    print(f"  checkpoint:        {final}")
    print(f"  sample grid:       {result['grid']}")
    print(f"  loss plot:         {Path(out) / 'loss.png'}")
    print(f"  prompt adherence:  {result['adherence']:.1%} on {result['prompts']} prompts")
    return result
