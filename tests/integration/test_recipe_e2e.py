"""Every recipe ingredient on at once (TREAD, REPA, LPIPS + DINO, contrastive, Muon, EMA) trains on CPU."""

import json

import daybreak  # noqa: F401,I001  (first: makes torchvision importable for transformers and lpips)
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from daybreak.config import load_config
from daybreak.run import train


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from torchvision.models.vgg import cfgs, make_layers

    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    torch.save(make_layers(cfgs["D"]).state_dict(), d / "vgg16_features.pth")
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                       image_size=32)
    Dinov2Model(cfg).save_pretrained(d / "dino")
    return d


def recipe(weights, run_dir, *extra):
    return load_config("tiny-recipe", [
        f"run.dir={run_dir}", f"repa.teacher_path={weights / 'dino'}", f"perceptual.dino_path={weights / 'dino'}",
        f"perceptual.lpips_vgg_path={weights / 'vgg16_features.pth'}", "perceptual.dino_resolution=32",
        "data.image_size=32", "sample.steps=2", *extra])


def test_everything_on_trains_without_nan(weights, tmp_path):
    final = train(recipe(weights, tmp_path / "fp32", "train.steps=3", "train.log_every=1"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/flow", "loss/repa", "loss/lpips", "loss/dino", "loss/contrastive"} <= set(rows[-1])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["skipped_nonfinite"] == 0
    assert (final / "recipe.safetensors").is_file()  # the REPA projector is checkpointed, the teacher is not
    assert (tmp_path / "fp32" / "samples" / "final.png").is_file()  # self-guidance sampling ran


def test_everything_on_under_bf16_autocast(weights, tmp_path):
    """A numerics check (bf16 matmuls are slow on these CPUs, so two steps only)."""
    train(recipe(weights, tmp_path / "bf16", "train.steps=2", "train.log_every=1", "train.precision=bf16",
                 "sample.prompts=[]"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_nonfinite"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
