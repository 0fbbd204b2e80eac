"""The run logger: metrics.jsonl that survives a kill mid-line, the loss plot's axes, and W&B offline."""

import importlib.util
import json

import pytest

from daybreak.training.logger import RunLogger, plot_losses, read_metrics, split_loss_keys


def test_negative_terms_get_their_own_linear_axis(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "loss/flow": 0.5 / s, "loss/repa": -0.2 - 0.01 * s,
             "loss/contrastive": -0.05, "grad_norm": 0.3} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert split_loss_keys(rows) == (["loss", "loss/flow"], ["loss/contrastive", "loss/repa"])

    import matplotlib.pyplot as plt

    seen = {}
    savefig = plt.Figure.savefig

    def capture(fig, *a, **k):
        seen.update({ax.get_title(): (ax.get_yscale(), sorted(t.get_text() for t in ax.get_legend().get_texts()))
                     for ax in fig.axes})
        return savefig(fig, *a, **k)

    plt.Figure.savefig = capture
    try:
        out = plot_losses(tmp_path)
    finally:
        plt.Figure.savefig = savefig
    assert out.is_file() and out.read_bytes().startswith(b"\x89PNG")
    assert seen == {tmp_path.name: ("log", ["loss", "loss/flow"]),
                    "terms that go to or below 0": ("linear", ["loss/contrastive", "loss/repa"])}


def test_a_half_written_line_is_skipped_and_the_next_row_starts_fresh(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    logger = RunLogger(tmp_path, enabled=True)
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb extra is not installed")
def test_wandb_offline_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = dict(project="daybreak-test", name="t", group="g", entity=None, config={"seed": 0})
    logger = RunLogger(tmp_path, wandb=settings)
    first = logger.wandb.id
    logger.log(1, {"loss": 0.5})
    logger.close()
    logger = RunLogger(tmp_path, wandb=settings)
    assert logger.wandb.id == first and (tmp_path / "wandb_id").read_text() == first
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
