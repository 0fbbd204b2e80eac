"""Where a run reports: metrics.jsonl (one JSON object per line), TensorBoard, and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Loss terms against step (raw and smoothed), plus any eval metric, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out or Path(run_dir) / "loss.png")
    loss_keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    ncols = 1 + (1 if eval_keys else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and isinstance(r[k], (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        line = ax.plot(xs, ys, alpha=0.3)[0]
        window = max(1, len(ys) // 20)
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, color=line.get_color(), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(Path(run_dir).name)
    if eval_keys:
        ax2 = axes[0][1]
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
