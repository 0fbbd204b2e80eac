"""Where a run reports: metrics.jsonl (one JSON object per line), TensorBoard, Weights & Biases when
asked (`log.wandb=true`), and PNG plots."""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import numpy as np

from daybreak.images import image_grid


class RunLogger:
    """`wandb`: keyword arguments of `wandb.init` (project, name, group, entity, config), or None for no
    W&B run. The W&B run id is kept in `wandb_id` in the run directory, so a resumed run logs on."""

    def __init__(self, run_dir: Path, enabled: bool = True, wandb: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if enabled and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a run killed mid-line: the next row starts on a line of its own
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if enabled and wandb is not None:
            import wandb as wb

            id_file = Path(run_dir) / "wandb_id"
            # a new id made here: wandb.util.generate_id is gone in recent wandb (0.31 has none)
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wb.init(id=run_id, resume="allow", dir=str(run_dir), **wandb)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def log_images(self, step: int, tag: str, images: list, prompts: list[str]) -> None:
        """Images with their prompts: in TensorBoard one captioned grid (`add_image`) and the prompts as
        text (`<tag>/prompts`); in W&B one `wandb.Image` per image, captioned with its prompt."""
        if not self.enabled or not images:
            return
        grid = image_grid(images, captions=prompts)
        self.tb.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        self.tb.add_text(f"{tag}/prompts", "\n\n".join(f"{i}: {p}" for i, p in enumerate(prompts)), step)
        if self.wandb is not None:
            import wandb as wb

            self.wandb.log({tag: [wb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or the half line of a run killed mid-write
            continue
    return rows


def split_loss_keys(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The logged loss terms that stay positive (a log axis) and those that reach 0 or below (REPA's
    −cos, contrastive FM's −λ·MSE: a linear axis of their own, instead of vanishing from a log scale)."""
    keys = sorted({k for r in rows for k in r if k.startswith("loss") and isinstance(r[k], (int, float))})
    signed = [k for k in keys if any(isinstance(r.get(k), (int, float)) and r[k] <= 0 for r in rows)]
    return [k for k in keys if k not in signed], signed


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Loss terms against step (raw and smoothed), plus any eval metric, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out or Path(run_dir) / "loss.png")
    log_keys, signed_keys = split_loss_keys(rows)
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/loss")})
    panels = [(keys, scale, title) for keys, scale, title in (
        (log_keys, "log", Path(run_dir).name), (signed_keys, "linear", "terms that go to or below 0"))
        if keys]
    ncols = max(1, len(panels)) + (1 if eval_keys else 0) + (1 if val_keys else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    for ax, (keys, scale, title) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r and isinstance(r[k], (int, float))]
            xs, ys = zip(*pts)
            line = ax.plot(xs, ys, alpha=0.3)[0]
            window = max(1, len(ys) // 20)
            smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                      for i in range(len(ys))]
            ax.plot(xs, smooth, color=line.get_color(), label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale(scale)
        ax.legend()
        ax.set_title(title)
    if val_keys:  # fixed t and noise per held-out example: no smoothing needed
        ax3 = axes[0][-1 - (1 if eval_keys else 0)]
        for k in val_keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            xs, ys = zip(*pts)
            ax3.plot(xs, ys, marker="o", markersize=3, label=k, linewidth=2 if k == "val/loss" else 1)
        ax3.set_xlabel("step")
        ax3.set_yscale("log")
        ax3.legend()
        ax3.set_title("validation loss per noise bin")
    if eval_keys:
        ax2 = axes[0][-1]
        for k in eval_keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            xs, ys = zip(*pts)
            ax2.plot(xs, ys, marker="o", label=k)
        ax2.set_xlabel("step")
        ax2.legend()
        ax2.set_title("evaluation")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
