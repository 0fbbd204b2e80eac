"""Options that touch collectives, run to completion under gloo ranks on CPU, each within a timeout.

The suite's shared 2-rank session (`helpers.gloo_job`: process start-up dominates the cost) runs: synchronous and asynchronous step
checkpoints of the same run (async must publish every checkpoint and end bitwise equal), activation
checkpointing (the same weights as without), sample grids and periodic evaluation inside training
(EMA swapped in on every rank), and SIGUSR1 delivered to rank 1 only. The shared 3-rank session runs the
async saves again (every checkpoint published, no hang): if rank 0 alone published, the other
ranks would take one extra barrier at the next save, a hang with any world size > 1.
Non-finite skips and SIGTERM under 2 ranks are in test_distributed.py.
"""

import os
import signal

import pytest
import torch
from helpers import Tap, gloo_job, tiny, weights

from daybreak.io import checkpoint as ck
from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics

SAVES = ["train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=0"]


@gloo_job(2)
def _two(rank: int, root: str) -> dict:
    out = {}
    for name, extra in (("sync", []), ("async", ["train.async_checkpoint=true"])):
        build_trainer(tiny(f"{root}/{name}", *SAVES, *extra), progress=False).fit()
    build_trainer(tiny(f"{root}/ac", "train.steps=2", "train.activation_checkpointing=true"), progress=False).fit()
    build_trainer(tiny(f"{root}/watch", "train.steps=2", "train.sample_every=1", "eval.every=1", "eval.num=2",
                       "eval.steps=1", "eval.metrics=[adherence]", "sample.steps=1",
                       "sample.prompts=[a red circle on the left]"), progress=False).fit()
    trainer = build_trainer(tiny(f"{root}/usr1", "train.steps=10", "train.checkpoint_every=100"), progress=False)
    trainer.data = Tap(trainer.data, lambda i, b: os.kill(os.getpid(), signal.SIGUSR1) if rank == 1 and i == 1 else None)
    out["usr1"] = [trainer.fit().name, trainer.stopped_by]
    return out


@gloo_job(3)
def _three(rank: int, root: str) -> dict:
    build_trainer(tiny(f"{root}/async", *SAVES, "train.global_batch=6", "train.async_checkpoint=true"),
                  progress=False).fit()
    return {}


@pytest.fixture(scope="module")
def two_ranks(gloo_ranks):
    """Within the deadline of the shared session (`gloo_job`'s timeout): a hang fails instead of blocking."""
    return gloo_ranks(_two)


@pytest.fixture(scope="module")
def three_ranks(gloo_ranks):
    return gloo_ranks(_three)[0]


def _async_equals_sync(root) -> None:
    for name in ("sync", "async"):
        assert [s for s, _ in ck.list_checkpoints(root / name)] == [1, 2, 3, 4], name  # every one published
        assert not list((root / name / "checkpoints").glob(".tmp-*"))
    a, b = weights(root / "sync" / "final"), weights(root / "async" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in ("step_0000001", "step_0000002", "step_0000003"):
        x, y = (ck.load_tensors(root / n / "checkpoints" / step, "transformer_ema.safetensors") for n in ("sync", "async"))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_async_checkpoints_on_two_ranks_publish_all_and_match_sync(two_ranks):
    _async_equals_sync(two_ranks[0])


def test_async_checkpoints_on_three_ranks_publish_all(three_ranks):
    assert [s for s, _ in ck.list_checkpoints(three_ranks / "async")] == [1, 2, 3, 4]
    assert not list((three_ranks / "async" / "checkpoints").glob(".tmp-*"))
    assert all(torch.isfinite(v).all() for v in weights(three_ranks / "async" / "final").values())


def test_activation_checkpointing_on_two_ranks_gives_the_same_weights(two_ranks):
    root, _ = two_ranks
    step2 = root / "sync" / "checkpoints" / "step_0000002"
    for name in ("transformer.safetensors", "transformer_ema.safetensors"):
        a, b = ck.load_tensors(step2, name), ck.load_tensors(root / "ac" / "final", name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name


def test_sample_grids_and_periodic_eval_on_two_ranks(two_ranks):
    root, _ = two_ranks
    for name in ("step_0000001.png", "step_0000002.png", "final.png"):
        assert (root / "watch" / "samples" / name).is_file(), name
    evals = [r for r in read_metrics(root / "watch") if "eval/adherence" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(0.0 <= r["eval/adherence"] <= 1.0 for r in evals)


def test_sigusr1_on_one_rank_stops_both_at_the_same_step(two_ranks):
    root, ranks = two_ranks
    assert [r["usr1"] for r in ranks] == [["step_0000002", signal.SIGUSR1]] * 2  # both exit 128 + 10
    assert ck.checkpoint_step(root / "usr1" / "checkpoints" / "step_0000002") == 2
