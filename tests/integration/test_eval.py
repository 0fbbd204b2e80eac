"""`daybreak eval` end to end on a tiny checkpoint with the download-free extractor, and periodic eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.evaluate.periodic import PeriodicEval
from daybreak.evaluate.run import Evaluator, default_eval_path, evaluate_checkpoint, parse_data, parse_metrics
from daybreak.build import build_parts
from daybreak.run import train

FAST = ["train.steps=2", "train.checkpoint_every=1", "eval.steps=2", "sample.steps=2", "sample.prompts=[]"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return train(load_config("tiny", [f"run.dir={run}", *FAST]), progress=False)


def test_eval_writes_finite_deterministic_metrics(tiny_ckpt, tmp_path):
    kwargs = dict(num=6, cache_dir=tmp_path / "ref", steps=2)
    first = evaluate_checkpoint(tiny_ckpt, "fd_tiny,adherence", out=tmp_path / "a.json", **kwargs)
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["metrics"] == first["metrics"]
    assert math.isfinite(first["metrics"]["fd_tiny"]) and first["metrics"]["fd_tiny"] >= 0
    assert 0.0 <= first["metrics"]["adherence"] <= 1.0
    assert first["step"] == 2 and first["num"] == 6 and first["reference"]["source"] == "shapes"
    assert (tmp_path / "a_grid.png").is_file()
    assert len(list((tmp_path / "ref").glob("tiny-*.npz"))) == 1  # reference stats cached
    again = evaluate_checkpoint(tiny_ckpt, ["fd_tiny", "adherence"], out=tmp_path / "b.json", **kwargs)
    assert again["metrics"] == first["metrics"]
    other_seed = evaluate_checkpoint(tiny_ckpt, ["fd_tiny"], out=tmp_path / "c.json", seed=7, **kwargs)
    assert other_seed["metrics"]["fd_tiny"] != first["metrics"]["fd_tiny"]


def test_default_eval_path_sits_beside_the_run(tiny_ckpt):
    assert default_eval_path(tiny_ckpt) == tiny_ckpt.parent / "eval" / "final.json"
    step = tiny_ckpt.parent / "checkpoints" / "step_0000001"
    assert default_eval_path(step) == tiny_ckpt.parent / "eval" / "step_0000001.json"


def test_fid_json_says_it_is_the_standard_definition():
    from daybreak.evaluate.run import NOTES

    assert "standard FID" in NOTES["fid"]


@pytest.mark.parametrize("metric,key", [("cmmd", "eval.clip_path"), ("fid", "eval.inception_path"),
                                        ("dino_mmd", "eval.dino_path")])
def test_missing_weights_name_the_config_key(metric, key, tmp_path):
    with pytest.raises(UserError, match=key):
        Evaluator(load_config("tiny"), [metric], num=4, cache_dir=tmp_path)


def test_bad_metric_and_data_are_user_errors(tmp_path):
    cfg = load_config("tiny")
    with pytest.raises(UserError, match="unknown metric"):
        parse_metrics("fid,bogus")
    with pytest.raises(UserError, match="--data"):
        parse_data("no/such/dir", cfg)
    assert parse_data(f"imagefolder:{tmp_path}", cfg) == ("imagefolder", str(tmp_path))
    assert parse_data(None, cfg) == ("shapes", None)
    with pytest.raises(UserError, match="adherence"):
        Evaluator(cfg, ["adherence"], num=4, data=str(tmp_path), cache_dir=tmp_path)


def test_periodic_eval_logs_eval_keys_and_restores_train_mode(tmp_path):
    cfg = load_config("tiny", ["eval.every=5", "eval.steps=2", "eval.num=4", "eval.metrics=[fd_tiny,adherence]"])
    periodic = PeriodicEval(cfg, device=torch.device("cpu"), cache_dir=str(tmp_path))
    assert [s for s in range(12) if periodic.due(s)] == [5, 10]
    parts = build_parts(cfg)
    parts.transformer.train()
    values = periodic(parts)
    assert set(values) == {"eval/fd_tiny", "eval/adherence"}
    assert all(math.isfinite(v) for v in values.values())
    assert parts.transformer.training
    off = PeriodicEval(load_config("tiny"), device=torch.device("cpu"))
    assert not any(off.due(s) for s in range(50))
