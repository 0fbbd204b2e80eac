"""The planner's layouts (HSDP, reduce dtype, kept blocks, FP8) term by term, `--json` and `--compare`."""

import json

import pytest
import torch

from daybreak.bench.flops import forward_flops, parameter_count, train_flops
from daybreak.bench.plan import Layout, compare, fp8_parameters, muon_parameters, muon_shapes, plan, plan_stage
from daybreak.build import model_kwargs
from daybreak.cli import main
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model import build_transformer
from daybreak.optim import muon_cost
from daybreak.recipe import block_tokens
from daybreak.training.fp8 import _kept_high_precision

STAGES = ["speedrun-512", "speedrun-1024"]
RATE = 989e12 * 0.4  # H200 bf16 dense peak × MFU 0.4


def test_hsdp_per_node_terms_by_hand():
    """Stage 1 on 4 nodes × 8 H200 as 4 replicas of 8: NVLink (450 GB/s) inside, InfiniBand (50 GB/s) across."""
    cfg = load_config("speedrun-512", ["train.fp8=false"])
    model = model_kwargs(cfg)
    p = parameter_count(model)
    block = (p - parameter_count({**model, "depth": 0})) // 16
    stage = plan_stage(cfg, 32, "h200", 2.0, 0.4)
    assert stage.layout == "HSDP 4×8, fp32 reduce"
    # all-gather forward + backward (the last block kept), fp32 reduce-scatter in a node; all-reduce of 1/8 across
    inside = (2 * 2 * p - 2 * block + 4 * p) * 7 / 8 / 450e9
    across = 2 * 4 * p / 8 * 3 / 4 / 50e9
    assert stage.seconds["fsdp"] == pytest.approx(inside + across)
    ns = muon_cost(muon_shapes(model), 32, True, 5, 2, replicas=4)  # owners over all 32, results to every replica
    muon = muon_parameters(model)
    assert ns["flops"] == pytest.approx(muon_cost(muon_shapes(model), 1)["flops"] / 32, rel=0.02)
    assert ns["remote_bytes"] == pytest.approx(2 * muon * 3 / 32, rel=0.02)  # 3/4 of the results, 1/8 of each
    assert stage.seconds["muon"] == pytest.approx(ns["flops"] / RATE + ns["bytes"] / 450e9 + ns["remote_bytes"] / 50e9
                                                  + 20 * muon / 8 / 4.8e12)
    assert stage.memory["weights"] == 4 * p / 8 and stage.memory["ema"] == 4 * p / 8
    # each replica steps its own 1/8 of the state: EMA every 10 steps, AdamW on the rest of Muon's
    assert stage.seconds["ema"] == pytest.approx(12 * p / 8 / 4.8e12 / 10)
    assert stage.seconds["adamw"] == pytest.approx(28 * (p - muon) / 8 / 4.8e12)
    # bf16 reduction halves the gradient bytes on both links; keeping every block gathered drops the re-gather
    bf16 = plan_stage(cfg, 32, "h200", 2.0, 0.4, Layout.of(cfg, 32, reduce_dtype="bf16", keep_gathered=16))
    inside = (2 * 2 * p - 2 * 16 * block + 2 * p) * 7 / 8 / 450e9
    assert bf16.seconds["fsdp"] == pytest.approx(inside + 2 * 2 * p / 8 * 3 / 4 / 50e9)
    assert bf16.memory["gathered_blocks"] == 2 * 16 * block
    with pytest.raises(UserError, match="replicate=3"):
        Layout.of(cfg, 32, replicate=3)


def test_fp8_terms_by_hand():
    cfg = load_config("speedrun-512")  # FP8 tensorwise, HSDP per node
    model, n = model_kwargs(cfg), 256
    routing = block_tokens(cfg, n, model["depth"])
    stage = plan_stage(cfg, 32, "h200", 2.0, 0.4)
    fwd = forward_flops(model, 1024, n, 256, routing)
    fast = 3 * (fwd["qkv"] + fwd["out"] + fwd["text_kv"] + fwd["mlp"])
    total = train_flops(model, 1024, n, 256, routing)
    assert 0.8 < fast / total < 1  # most of the work is in the converted layers
    assert stage.seconds["model"] == pytest.approx((total - fast) / 32 / RATE + fast / 32 / (RATE * 2 * 0.65))
    # the layers convert_to_fp8 converts, counted on the model itself
    with torch.device("meta"):
        net = build_transformer(**model)
    converted = sum(m.weight.numel() for name, m in net.named_modules()
                    if isinstance(m, torch.nn.Linear) and not _kept_high_precision(name))
    p8 = fp8_parameters(model)
    assert p8 == converted
    # tensorwise all-gathers the converted weights in float8 (1 byte); rowwise keeps bf16
    p = parameter_count(model)
    block = (p - parameter_count({**model, "depth": 0})) // 16
    gathered = 2 * (p - p8) + p8
    inside = (2 * gathered - block * gathered / p + 4 * p) * 7 / 8 / 450e9
    assert stage.seconds["fsdp"] == pytest.approx(inside + 2 * 4 * p / 8 * 3 / 4 / 50e9)
    rowwise = plan_stage(cfg, 32, "h200", 2.0, 0.4, Layout.of(cfg, 32, fp8="rowwise"))
    assert stage.seconds["model"] < rowwise.seconds["model"] < plan_stage(
        cfg, 32, "h200", 2.0, 0.4, Layout.of(cfg, 32, fp8=False)).seconds["model"]
    with pytest.raises(UserError, match="A100 has no FP8"):
        plan_stage(load_config("tiny", ["train.fp8=rowwise"]), 1, "a100", 2.0, 0.4)


def test_plan_json_and_compare(capsys):
    assert main(["plan", *STAGES, "--gpus", "32", "--gpu", "h200", "--json"]) in (0, None)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    stages, total = lines[:2], lines[2]["total"]
    assert [s["name"] for s in stages] == STAGES
    for s in stages:
        assert s["step_seconds"] == pytest.approx(sum(s["exposed_seconds"].values()))
        assert s["hours"] == pytest.approx((s["steps"] * s["step_seconds"] + s["compile_seconds"]) / 3600)
        assert s["memory_total"] == pytest.approx(sum(v for k, v in s["memory"].items() if k != "activations_checkpointed"))
        assert s["bottleneck"] == max(s["exposed_seconds"], key=s["exposed_seconds"].get)
    assert total["hours"] == pytest.approx(sum(s["hours"] for s in stages))
    configs = [load_config(c) for c in STAGES]
    assert total["hours"] == pytest.approx(plan(configs, 32, "h200")["hours"])

    rows = {r["layout"]: r for r in compare(configs, 32, "h200")}
    assert list(rows) == ["FSDP", "HSDP per node", "+ bf16 reduce", "+ FP8 tensorwise", "the configs' layout"]
    fsdp = plan(load_config_all(["train.replicate=1", "train.fp8=false"]), 32, "h200")["hours"]
    assert rows["FSDP"]["hours"] == pytest.approx(fsdp)
    assert rows["the configs' layout"]["hours"] == pytest.approx(total["hours"])
    # each switch pays or is free: HSDP hides the traffic that bounds FSDP, FP8 shortens the compute
    h = [rows[k]["hours"] for k in ("FSDP", "HSDP per node", "+ bf16 reduce", "+ FP8 tensorwise")]
    assert h[0] > h[1] >= h[2] > h[3]
    assert rows["FSDP"]["stages"][0].bottleneck == "fsdp" and rows["HSDP per node"]["stages"][0].bottleneck != "fsdp"
    assert main(["plan", *STAGES, "--gpus", "32", "--compare"]) in (0, None)
    out = capsys.readouterr().out
    assert "HSDP per node" in out and f"{h[3]:.2f} h" in out


def load_config_all(overrides: list[str]) -> list:
    return [load_config(c, overrides) for c in STAGES]


def test_layout_keys_are_checked():
    from daybreak.training.parallel import replicas

    assert load_config("tiny", ["train.replicate=node"]).train.replicate == "node"
    for bad, key in (("train.replicate=0", "train.replicate"), ("train.replicate=nodes", "train.replicate"),
                     ("train.reduce_dtype=fp16", "train.reduce_dtype"), ("train.fp8=fp8", "train.fp8"),
                     ("train.keep_gathered_blocks=-1", "train.keep_gathered_blocks")):
        with pytest.raises(UserError, match=key):
            load_config("tiny", [bad])
    assert replicas("node", 32, 8) == 4 and replicas(2, 4) == 2 and replicas("node", 4, 4) == 1
    with pytest.raises(UserError, match="does not divide"):
        replicas(3, 4)
