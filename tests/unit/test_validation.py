"""The validation loss per noise bin: fixed draws, hand-worked values, the held-out split, the bins."""

import math

import pytest
import torch
from helpers import tiny

from daybreak.build import build_parts
from daybreak.config import load_config
from daybreak.data import build_data
from daybreak.errors import UserError
from daybreak.training.distributed import Dist
from daybreak.training.validation import ValLoss, strata, val_draw

ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _setup(tmp_path, *extra):
    cfg = tiny(tmp_path, "val.every=1", "val.num=5", "text.tokenizer_sample=100", *extra)
    torch.manual_seed(0)
    parts = build_parts(cfg)
    return cfg, parts, ValLoss(cfg, parts.pixels_per_token, log=lambda *_: None)


def test_t_is_stratified_inside_each_bin_and_draws_are_keyed():
    n = 7
    for b, (lo, hi) in enumerate([(0.0, 0.3), (0.6, 1.0)]):
        s = strata(3, n, b)
        ts = [val_draw(3, j, b, lo, hi, int(s[j]), n, (2,))[0] for j in range(n)]
        # example j sits in its own 1/n slice of the bin: the slices are a permutation of 0 … n − 1
        assert sorted(math.floor((t - lo) / (hi - lo) * n) for t in ts) == list(range(n))
    t1, z1 = val_draw(3, 4, 1, 0.3, 0.6, 2, 7, (3, 2))
    t2, z2 = val_draw(3, 4, 1, 0.3, 0.6, 2, 7, (3, 2))
    assert t1 == t2 and torch.equal(z1, z2)
    assert not torch.equal(z1, val_draw(4, 4, 1, 0.3, 0.6, 2, 7, (3, 2))[1])  # val.seed changes it
    assert not torch.equal(z1, val_draw(3, 5, 1, 0.3, 0.6, 2, 7, (3, 2))[1])  # so does the example
    assert not torch.equal(z1, val_draw(3, 4, 2, 0.3, 0.6, 2, 7, (3, 2))[1])  # and the bin


def test_zero_output_model_gives_the_hand_worked_loss(tmp_path):
    """The tiny model's final layer starts at zero, so it predicts x̂0 = 0 (x-prediction) or v = 0
    (v-prediction); the flow loss of one (example, bin) is then mean(x0²)/max(t, 0.05)² or
    mean((noise − x0)²)."""
    for prediction in ("x", "v"):
        cfg, parts, val = _setup(tmp_path / prediction, f"objective.prediction={prediction}")
        values = val(parts, ONE, torch.device("cpu"))
        n = len(val.examples)
        for b, (lo, hi) in enumerate(cfg.val.bins):
            s = strata(cfg.val.seed, n, b)
            losses = []
            for j, image in enumerate(val.examples.images):
                x0 = torch.tensor(image).permute(2, 0, 1).double() / 127.5 - 1
                t, noise = val_draw(cfg.val.seed, j, b, lo, hi, int(s[j]), n, tuple(x0.shape))
                if prediction == "x":
                    losses.append(x0.double().pow(2).mean().item() / max(t, 0.05) ** 2)
                else:
                    losses.append((noise.double() - x0.double()).pow(2).mean().item())
            assert values[f"val/loss_{lo}-{hi}"] == pytest.approx(sum(losses) / n, rel=1e-5)
        assert values["val/loss"] == pytest.approx(sum(values[f"val/loss_{lo}-{hi}"] for lo, hi in cfg.val.bins) / 3)


def test_same_weights_same_values_and_bins_as_configured(tmp_path):
    cfg, parts, val = _setup(tmp_path, "val.bins=[[0.0, 0.25], [0.25, 1]]", "train.micro_batch=4",
                             "train.global_batch=8")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in parts.transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a model whose output depends on t, noise and caption
    parts.transformer.train()
    first = val(parts, ONE, torch.device("cpu"))
    assert list(first) == ["val/loss", "val/loss_0.0-0.25", "val/loss_0.25-1.0"]
    assert parts.transformer.training  # modes restored
    again = ValLoss(cfg, parts.pixels_per_token, log=lambda *_: None)(parts, ONE, torch.device("cpu"))
    assert again == first  # bit for bit, from a fresh watcher
    with torch.no_grad():
        next(parts.transformer.parameters()).mul_(1.5)
    assert val(parts, ONE, torch.device("cpu"))["val/loss"] != first["val/loss"]


def test_held_out_tail_is_never_trained_on(tmp_path):
    cfg = tiny(tmp_path, "val.every=10", "val.num=30", "data.length=100")
    loader = build_data(cfg, batch_size=8, patch=8)
    assert len(loader.source) == 70
    with pytest.raises(IndexError):
        loader.source[70]
    assert len(build_data(tiny(tmp_path, "data.length=100"), batch_size=8, patch=8).source) == 100  # val off
    assert len(build_data(tiny(tmp_path, "val.every=10", "val.data.source=shapes", "data.length=100"),
                          batch_size=8, patch=8).source) == 100  # its own source: nothing held out
    with pytest.raises(UserError, match="val.num"):
        build_data(tiny(tmp_path, "val.every=10", "val.num=100", "data.length=100"), batch_size=8, patch=8)


def test_bad_bins_are_one_line_errors():
    with pytest.raises(UserError, match=r"val.bins\[1\]"):
        load_config("tiny", ["val.bins=[[0, 0.5], [0.7, 0.6]]"])
    with pytest.raises(UserError, match="val.bins"):
        load_config("tiny", ["val.bins=[]"])
    with pytest.raises(UserError, match="val.data.path"):
        load_config("tiny", ["val.data.source=imagefolder"])
