"""FP8 matmuls (`train.fp8`) in torchao's emulation mode, the only FP8 a CPU runs.

Stated tolerances, against the same model under bf16 autocast (the GPU path it replaces):
- the loss within 1e-3 relative;
- the gradients of the FP8 layers' weights within 10 % (relative L2 over all of them; e4m3 keeps 3
  mantissa bits, a rounding step of 6 %, averaged down by the dot products), and more than bf16's own
  error against fp32, so the rounding is really there;
- a 10-step emulated run's loss within 1 % of the fp32 run's at every step.
"""

import copy

import pytest
import torch
from helpers import tiny

from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model import build_transformer, preset
from daybreak.run import build_trainer
from daybreak.training.fp8 import check_fp8, convert_to_fp8
from daybreak.training.logger import read_metrics


def _loss_and_grads(model, x, t, txt, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, txt, None)
    loss = (out.float() - x).square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: dict, b: dict, keys) -> float:
    num = sum((a[k] - b[k]).square().sum() for k in keys)
    return (num / sum(b[k].square().sum() for k in keys)).sqrt().item()


def test_fp8_loss_and_gradients_within_tolerance_of_bf16():
    torch.manual_seed(0)
    model = build_transformer(**{**preset("tiny"), "hidden_size": 128, "num_heads": 4, "axes_dim": [16, 16]})
    with torch.no_grad():  # the zero-initialised modulation and final layer would make every block an identity
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                torch.nn.init.normal_(p, std=0.05)
    x, t, txt = torch.randn(4, 3, 32, 32), torch.rand(4), torch.randn(4, 8, 32)
    fp32 = _loss_and_grads(model, x, t, txt, autocast=False)
    bf16 = _loss_and_grads(model, x, t, txt, autocast=True)
    for recipe in ("tensorwise", "rowwise"):
        fp8 = copy.deepcopy(model)
        names = convert_to_fp8(fp8, recipe, emulate=True)
        # the six matmuls of each block; embeddings, final layer and modulation stay high precision
        assert names == [f"blocks.{i}.{n}" for i in range(4) for n in (
            "attention.img_qkv_proj", "attention.txt_kv_proj", "attention.to_out.0", "gate_proj", "up_proj",
            "down_proj")]
        assert type(fp8.blocks[0].modulation.lin) is torch.nn.Linear and type(fp8.final_layer.linear) is torch.nn.Linear
        loss, grads = _loss_and_grads(fp8, x, t, txt, autocast=True)
        assert abs(loss - bf16[0]) <= 1e-3 * bf16[0], recipe
        weights = [f"{n}.weight" for n in names]
        err = _rel(grads, bf16[1], weights)
        assert _rel(bf16[1], fp32[1], weights) < err <= 0.10, recipe


def test_fp8_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(UserError, match="compute capability >= 8.9"):
        check_fp8("tensorwise", torch.device("cpu"), emulate=False)
    check_fp8("rowwise", torch.device("cpu"), emulate=True)
    with pytest.raises(UserError, match="train.fp8"):
        load_config("tiny", ["train.fp8=true"])
    with pytest.raises(UserError, match="train.fp8_emulate=true"):
        build_trainer(tiny(tmp_path, "train.fp8=rowwise"), progress=False)


def test_short_emulated_fp8_run_tracks_fp32(tmp_path):
    steps = ["train.steps=10", "train.checkpoint_every=100"]
    build_trainer(tiny(tmp_path / "fp32", *steps), progress=False).fit()
    trainer = build_trainer(tiny(tmp_path / "fp8", *steps, "train.fp8=tensorwise", "train.fp8_emulate=true"),
                            progress=False)
    assert type(trainer.transformer.blocks[0].gate_proj).__name__ == "Float8Linear"
    trainer.fit()
    a, b = ([r["loss"] for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("fp32", "fp8"))
    assert len(a) == len(b) == 10
    assert all(abs(x - y) <= 0.01 * x for x, y in zip(a, b))
    assert a != b  # the FP8 rounding reached the loss
