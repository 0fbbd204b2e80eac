"""The GPU's paths on CPU ranks (gloo): bf16 autocast under FSDP2, compile off and on; sample grids
and periodic evaluation split over ranks.

The suite's shared 2-rank session (`helpers.gloo_job`: process start-up dominates the cost) trains
the tiny model in bf16 autocast with compile off and with compile on (`aot_eager`: traces and differentiates like inductor, no C++
toolchain), recording the dtype of every timestep that reaches the model; the parent trains the
same config on one process and compares the weights. The same session samples a grid and runs an
evaluation with the prompts split over the ranks and whole on every rank, and compares them.
"""

import functools
import json

import numpy as np
import pytest
import torch
from helpers import gloo_job, max_diff, tiny, weights

import daybreak.model.transformer as transformer_module
from daybreak.run import build_trainer
from daybreak.training import parallel

# the final sample grid too: sampling on the bf16-gathered weights needs the step's autocast
BF16 = ["train.steps=1", "train.precision=bf16", "train.checkpoint_every=100", "text.tokenizer_sample=200",
        "sample.steps=1", "sample.prompts=[a red circle on the left]"]


def _recording_timesteps(seen: list[str]):
    """`timestep_embedding` as the model calls it, noting the dtype of the timestep it gets."""
    original = transformer_module.timestep_embedding

    def record(t, *args, **kwargs):
        seen.append(str(t.dtype))
        return original(t, *args, **kwargs)

    return record


@gloo_job(2)
def _worker(rank: int, root: str) -> dict:
    compile_blocks, timestep_embedding = parallel.compile_blocks, transformer_module.timestep_embedding
    parallel.compile_blocks = functools.partial(parallel.compile_blocks, backend="aot_eager")
    out: dict = {}
    try:  # the session's other jobs run in these processes too: put back what is patched here
        for compiled in (False, True):
            seen: list[str] = []
            transformer_module.timestep_embedding = _recording_timesteps(seen)
            name = f"compile-{str(compiled).lower()}"
            trainer = build_trainer(tiny(f"{root}/{name}", *BF16, f"train.compile={compiled}"), progress=False)
            trainer.fit()
            out[name] = {"timestep_dtypes": sorted(set(seen)), "step": trainer.step, "compiled": trainer.compiled}
    finally:
        parallel.compile_blocks, transformer_module.timestep_embedding = compile_blocks, timestep_embedding
    out.update(_split_sampling(root))
    return out


PROMPTS = ["a red circle on the left", "a blue square on the top", "a green triangle on the right"]


def _split_sampling(root: str) -> dict:
    """Grid and evaluation images with the prompts split over the ranks, against the whole set sampled
    on every rank (the 1-rank computation), same weights."""
    from daybreak.evaluate.periodic import PeriodicEval
    from daybreak.pipeline import Pipeline

    cfg = tiny(f"{root}/split", "train.steps=1", "text.tokenizer_sample=200", "sample.steps=1",
               f"sample.prompts={json.dumps(PROMPTS)}", "eval.every=1", "eval.num=3", "eval.steps=1",
               "eval.batch_size=2", "eval.metrics=[adherence]")
    trainer = build_trainer(cfg, progress=False)
    trainer.fit()  # its periodic evaluation and final grid take the split path
    shares: list[list[int]] = []
    with trainer.ema_weights() as parts:
        pipe = Pipeline(parts, cfg, trainer.device)
        whole = pipe(PROMPTS, seed=0)

        def share(idx):
            shares.append(idx)
            return pipe([PROMPTS[i] for i in idx], seeds=idx)

        split = trainer.dist.shared(len(PROMPTS), share)
        evaluation = PeriodicEval(cfg, trainer.device)
        eval_whole, eval_split = evaluation(parts), evaluation(parts, shared=trainer.dist.shared)
    out = {"shares": shares, "split_is_none": split is None}
    if split is not None:
        pixels = [torch.tensor(np.asarray(im), dtype=torch.int16) for im in (*whole, *split)]
        out["grid_max_diff"] = max((a - b).abs().max().item() for a, b in zip(pixels[:3], pixels[3:]))
        out["eval"] = [eval_whole, eval_split]
    return out


@pytest.fixture(scope="module")
def two_ranks(gloo_ranks):
    return gloo_ranks(_worker)


def test_fsdp_bf16_runs_compile_off_and_on_with_fp32_timesteps(two_ranks, tmp_path):
    root, ranks = two_ranks
    for out in ranks:
        for name, compiled in (("compile-false", False), ("compile-true", True)):
            assert out[name]["step"] == 1 and out[name]["compiled"] is compiled
            assert out[name]["timestep_dtypes"] == ["torch.float32"]  # cast_forward_inputs=False: t stays fp32
    one = build_trainer(tiny(tmp_path / "one", *BF16, "train.compile=false"), progress=False)
    one.fit()
    single = weights(tmp_path / "one" / "final")
    for name in ("compile-false", "compile-true"):
        diff = max_diff(weights(root / name / "final"), single)
        # the two layouts sum and round in another order (2 micro batches vs 2 ranks): observed 2e-10,
        # where the same run in fp32 lands 2e-3 away from the bf16 one
        assert diff < 1e-4, (name, diff)


def test_grid_and_evaluation_split_over_ranks_equal_the_whole_set(two_ranks):
    root, ranks = two_ranks
    assert ranks[0]["shares"] == [[0, 1]] and ranks[1]["shares"] == [[2, 2]]  # 3 prompts, padded to 2 + 2
    assert not ranks[0]["split_is_none"] and ranks[1]["split_is_none"]  # gathered on rank 0 only
    assert ranks[0]["grid_max_diff"] <= 1  # uint8 levels: batch composition changes rounding only
    whole, split = ranks[0]["eval"]
    assert set(whole) == {"eval/adherence"} and whole == split
    assert (root / "split" / "samples" / "final.png").is_file()
    rows = [json.loads(line) for line in (root / "split" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/adherence" in r for r in rows)  # the periodic evaluation logged from rank 0
