"""The GPU's precision path on CPU ranks: bf16 autocast under FSDP2 (gloo), compile off and on.

One 2-process session (process start-up dominates the cost) trains the tiny model in bf16 autocast
with compile off and with compile on (`aot_eager`: traces and differentiates like inductor, no C++
toolchain), recording the dtype of every timestep that reaches the model; the parent trains the
same config on one process and compares the weights.
"""

import functools
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import finish_rank, free_port, max_diff, tiny, weights

import daybreak.model.transformer as transformer_module
from daybreak.run import build_trainer
from daybreak.training import parallel

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = ["train.steps=2", "train.precision=bf16", "train.checkpoint_every=100", "text.tokenizer_sample=200"]


def _recording_timesteps(seen: list[str]):
    """`timestep_embedding` as the model calls it, noting the dtype of the timestep it gets."""
    original = transformer_module.timestep_embedding

    def record(t, *args, **kwargs):
        seen.append(str(t.dtype))
        return original(t, *args, **kwargs)

    return record


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    parallel.compile_blocks = functools.partial(parallel.compile_blocks, backend="aot_eager")
    out: dict = {}
    for compiled in (False, True):
        seen: list[str] = []
        transformer_module.timestep_embedding = _recording_timesteps(seen)
        name = f"compile-{str(compiled).lower()}"
        trainer = build_trainer(tiny(f"{root}/{name}", *BF16, f"train.compile={compiled}"), progress=False)
        trainer.fit()
        out[name] = {"timestep_dtypes": sorted(set(seen)), "step": trainer.step, "compiled": trainer.compiled}
    finish_rank(root, rank, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=2, join=True)
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp_bf16_runs_compile_off_and_on_with_fp32_timesteps(two_ranks, tmp_path):
    root, ranks = two_ranks
    for out in ranks:
        for name, compiled in (("compile-false", False), ("compile-true", True)):
            assert out[name]["step"] == 2 and out[name]["compiled"] is compiled
            assert out[name]["timestep_dtypes"] == ["torch.float32"]  # FSDP no longer casts t to bf16
    one = build_trainer(tiny(tmp_path / "one", *BF16, "train.compile=false"), progress=False)
    one.fit()
    single = weights(tmp_path / "one" / "final")
    for name in ("compile-false", "compile-true"):
        diff = max_diff(weights(root / name / "final"), single)
        # bf16 noise: the two layouts sum and round in a different order (2 micro batches vs 2 ranks)
        assert diff < 2e-2, (name, diff)
