"""Watching a run: the learning-rate schedule across a stop and resume, and the image grids in TensorBoard."""

import math
import os
import signal

import pytest
import torch
from helpers import Tap, tiny, weights
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics

RUN = ["optim.schedule=cosine", "optim.min_lr_ratio=0.1", "train.steps=4", "train.checkpoint_every=100",
       "train.sample_every=2", "sample.prompts=[a red circle on the left]", "sample.steps=2",
       "eval.every=4", "eval.metrics=[adherence]", "eval.num=2", "eval.steps=2", "text.tokenizer_sample=200"]


def test_cosine_schedule_resumes_exactly_and_grids_reach_tensorboard(tmp_path):
    straight = build_trainer(tiny(tmp_path / "straight", *RUN), progress=False).fit()
    trainer = build_trainer(tiny(tmp_path / "stopped", *RUN), progress=False)
    trainer.data = Tap(trainer.data, lambda i, b: os.kill(os.getpid(), signal.SIGTERM) if i == 1 else None)
    assert trainer.fit().name == "step_0000002"
    resumed = build_trainer(tiny(tmp_path / "stopped", *RUN), progress=False).fit()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # lr after step k (the next step's): 1e-3 · (0.1 + 0.9 · (1 + cos(π k / 4)) / 2), Muon and AdamW alike
    expected = [1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * k / 4)) / 2) for k in (1, 2, 3, 4)]
    for run in ("straight", "stopped"):
        rows = [r for r in read_metrics(tmp_path / run) if "lr/muon" in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert [r["lr/muon"] for r in rows] == pytest.approx(expected)
        assert [r["lr/adamw"] for r in rows] == pytest.approx(expected)

    events = EventAccumulator(str(tmp_path / "straight" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4, 4]  # sample_every, then the final grid
    assert [e.step for e in events.Images("eval/samples")] == [4]
    prompts = events.Tensors("samples/prompts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert prompts == "0: a red circle on the left"
