"""FSDP2 on CPU (2 gloo ranks, in the suite's shared 2-rank session) against one process with the same global batch.

One 2-process session runs every scenario (process start-up dominates the cost), then the parent
compares with single-process runs:
- AdamW, Muon, and Muon with resolution-aware conditioning (a replicated recipe part with EMA): 4 steps
  on 2 ranks end with the weights (raw, EMA, text tower, recipe) of 4 steps on 1 rank with 2 accumulated
  micro batches, to ≤ 1e-5 (observed ~1e-7: summation order only);
- a 2-rank step checkpoint resumes on 1 process and ends where the 1-process run ends;
- SIGTERM delivered to rank 1 only, and a NaN in rank 1's batch only: both ranks take the same
  decision at the same step;
- `optim.Muon` on FSDP2-sharded matrices gives the update it gives on the full matrices;
- on the speedrun's `data.mix` (replicas of its three datasets), 2 ranks end where 1 process does, having
  drawn the same samples from each entry.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import Tap, gloo_job, max_diff, mix_overrides, tiny, weights, write_replicas

from daybreak.io import checkpoint as ck
from daybreak.training.logger import read_metrics
from daybreak.run import build_trainer

STEPS = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
# a replicated recipe part with EMA among the sharded transformer: resolution-aware conditioning
SCENARIO = {"adamw": ["optim.name=adamw"], "muon": ["optim.name=muon"],
            "resolution": ["optim.name=muon", "resolution_aware.enabled=true"]}


def _val(root) -> list[str]:
    """One step from the trained AdamW run, then the validation loss (3 examples × 3 bins: rank 1 pads)."""
    return [f"init_from={root}/adamw/final", "train.steps=1", "val.every=1", "val.num=3"]


def _muon_sharded_vs_full(rank: int) -> float:
    """Max |Δ| between Muon steps on FSDP2 shards (gathered) and on the full matrices."""
    from torch.distributed.fsdp import fully_shard

    from daybreak.optim import Muon

    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(12, 7, bias=False), torch.nn.Linear(7, 5, bias=False))
    sharded = torch.nn.Sequential(torch.nn.Linear(12, 7, bias=False), torch.nn.Linear(7, 5, bias=False))
    sharded.load_state_dict(full.state_dict())
    for m in sharded:
        fully_shard(m)
    fully_shard(sharded)
    opt_full, opt_sharded = Muon(full.parameters(), lr=0.1), Muon(sharded.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(6, 12)
        for model, opt in ((full, opt_full), (sharded, opt_sharded)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    return max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), full.parameters()))


def _mix(root) -> list[str]:
    return mix_overrides({n: Path(root) / "replicas" / n for n in ("flux_generated", "FLUX-Reason-6M",
                                                                    "midjourney-v6-llava")}, "speedrun-1024")


@gloo_job(2, prepare=lambda root: write_replicas(root / "replicas"))
def _worker(rank: int, root: str) -> dict:
    out: dict = {}
    for name in ("adamw", "muon", "resolution"):
        build_trainer(tiny(f"{root}/{name}", *STEPS, *SCENARIO[name]), progress=False).fit()
    build_trainer(tiny(f"{root}/val", *_val(root)), progress=False).fit()
    build_trainer(tiny(f"{root}/mix", *STEPS, *_mix(root)), progress=False).fit()

    trainer = build_trainer(tiny(f"{root}/sigterm", "train.steps=10", "train.checkpoint_every=100"), progress=False)
    trainer.data = Tap(trainer.data, lambda i, b: os.kill(os.getpid(), signal.SIGTERM) if rank == 1 and i == 1 else None)
    out["sigterm"] = [trainer.fit().name, trainer.stopped_by]  # every rank exits 128 + SIGTERM

    trainer = build_trainer(tiny(f"{root}/nan", "train.steps=3", "train.checkpoint_every=100"), progress=False)
    trainer.data = Tap(trainer.data, lambda i, b: b.update(pixels=torch.full(b["pixels"].shape, float("nan"))) if rank == 1 and i == 1 else None)
    trainer.fit()
    out["nan"] = [trainer.step, trainer.nonfinite_total]

    out["muon_sharded_vs_full"] = _muon_sharded_vs_full(rank)
    return out


@pytest.fixture(scope="module")
def two_ranks(gloo_ranks):
    return gloo_ranks(_worker)


@pytest.mark.parametrize("name", list(SCENARIO))
def test_two_ranks_match_one_process(two_ranks, tmp_path, name):
    root, _ = two_ranks
    single = build_trainer(tiny(tmp_path / name, *STEPS, *SCENARIO[name]), progress=False).fit()
    a, b = weights(single), weights(root / name / "final")
    assert max_diff(a, b) <= 1e-5
    if name == "resolution":  # the embedder and its EMA too
        for part in ("recipe", "recipe_ema"):
            assert max_diff(ck.load_tensors(single, f"{part}.safetensors"),
                            ck.load_tensors(root / name / "final", f"{part}.safetensors")) <= 1e-5
    # the tolerance is tight against what two steps change
    mid = ck.load_tensors(root / name / "checkpoints" / "step_0000002", "transformer.safetensors")
    assert max_diff({f"transformer/{k}": v for k, v in mid.items()},
                    {k: v for k, v in b.items() if k.startswith("transformer/")}) > 1e-3


def test_two_rank_checkpoint_resumes_on_one_process(two_ranks, tmp_path, capsys):
    root, _ = two_ranks
    run = tmp_path / "resumed"
    shutil.copytree(root / "muon" / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000002")
    assert json.loads((run / "checkpoints" / "step_0000002" / "meta.json").read_text())["world_size"] == 2
    capsys.readouterr()
    final = build_trainer(tiny(run, *STEPS, "optim.name=muon"), progress=False).fit()
    assert "resumed from step 2" in capsys.readouterr().out
    assert max_diff(weights(final), weights(root / "muon" / "final")) <= 1e-5


def test_signal_and_nonfinite_decisions_are_the_same_on_every_rank(two_ranks):
    root, ranks = two_ranks
    # only rank 1 got SIGTERM, during step 2: both stop there, and both stop as SIGTERM's (exit 143)
    assert [r["sigterm"] for r in ranks] == [["step_0000002", signal.SIGTERM]] * 2
    assert ck.checkpoint_step(root / "sigterm" / "checkpoints" / "step_0000002") == 2
    assert [r["nan"] for r in ranks] == [[3, 1]] * 2  # rank 1's NaN skipped the step on both ranks


def test_muon_update_is_the_same_sharded_and_full(two_ranks):
    _, ranks = two_ranks
    assert all(r["muon_sharded_vs_full"] <= 1e-6 for r in ranks)


def test_validation_loss_is_the_same_on_two_ranks(two_ranks, tmp_path):
    from daybreak.training.logger import read_metrics

    root, _ = two_ranks
    build_trainer(tiny(tmp_path / "val", *_val(root)), progress=False).fit()
    one, two = ([r for r in read_metrics(d) if "val/loss" in r] for d in (tmp_path / "val", root / "val"))
    assert len(one) == len(two) == 1 and len(one[0]) == 5  # step, val/loss and three bins
    for k, v in one[0].items():
        assert two[0][k] == pytest.approx(v, rel=1e-4), k


def test_two_ranks_match_one_process_on_a_mix(two_ranks, tmp_path):
    root, _ = two_ranks
    single = build_trainer(tiny(tmp_path / "mix", *STEPS, *_mix(root)), progress=False).fit()
    assert max_diff(weights(single), weights(root / "mix" / "final")) <= 1e-5
    drawn = [{k: v for k, v in read_metrics(run)[-1].items() if k.startswith("data/")} for run in (tmp_path / "mix",
                                                                                                   root / "mix")]
    assert drawn[0] == drawn[1] and sum(drawn[0].values()) == 16
