"""The run logger: metrics.jsonl that survives a kill mid-line, the loss plot's axes, and W&B offline."""

import importlib.util
import json

import pytest

from daybreak.training.logger import RunLogger, plot_losses, read_metrics, split_loss_keys


def test_negative_terms_get_their_own_linear_axis(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "loss/flow": 0.5 / s, "loss/repa": -0.2 - 0.01 * s,
             "loss/contrastive": -0.05, "grad_norm": 0.3} for s in range(1, 6)]
    rows += [{"step": s, "val/loss": 0.6 / s, "val/loss_0.0-0.5": 0.8 / s, "val/loss_0.5-1.0": 0.4 / s} for s in (2, 4)]
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
                    "terms that go to or below 0": ("linear", ["loss/contrastive", "loss/repa"]),
                    "validation loss per noise bin": ("log", ["val/loss", "val/loss_0.0-0.5", "val/loss_0.5-1.0"])}


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


def test_image_grids_read_back_with_tensorboards_event_reader(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from daybreak.images import image_grid

    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    prompts = ["a red square", "a blue square", "a green square"]
    logger = RunLogger(tmp_path)
    logger.log_images(7, "samples", images, prompts)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (shot,) = events.Images("samples")
    assert shot.step == 7
    got = np.asarray(Image.open(io.BytesIO(shot.encoded_image_string)).convert("RGB"))
    assert np.array_equal(got, np.asarray(image_grid(images, captions=prompts)))  # the captioned grid, lossless
    (text,) = events.Tensors("samples/prompts/text_summary")
    assert text.step == 7 and text.tensor_proto.string_val[0].decode() == "0: a red square\n\n1: a blue square\n\n2: a green square"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb extra is not installed")
def test_wandb_offline_gets_the_images_with_their_prompts(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, wandb=dict(project="daybreak-test", name="images"))
    logged = []
    log = logger.wandb.log
    logger.wandb.log = lambda data, **kw: (logged.append((data, kw)), log(data, **kw))
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    logger.log_images(3, "samples", images, ["a red circle", "a blue square"])
    logger.close()
    ((data, kw),) = logged
    assert kw == {"step": 3} and [im._caption for im in data["samples"]] == ["a red circle", "a blue square"]
    assert len(list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))) == 2
