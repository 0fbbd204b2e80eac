"""`daybreak train` end to end on the tiny config: the run directory's contents, resume, config errors,
and the per-block wrappers (activation checkpointing, regional compile) that must not change the maths."""

import copy
import functools
import json

import pytest
import torch
from helpers import SMALL

from daybreak import load_model
from daybreak.build import build_denoiser
from daybreak.cli import main
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model import build_transformer, preset
from daybreak.io import checkpoint as ck
from daybreak.training import parallel
from daybreak.run import build_trainer


def test_train_writes_the_run_directory_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "tiny", f"run.dir={run}", *SMALL, "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    assert main([*args, "train.steps=5", "--no-progress"]) == 0
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").train.steps == 5
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in ck.list_checkpoints(run)] == [4, 5]  # keep_checkpoints=2 pruned step 2
    assert ck.checkpoint_step(run / "final") == 5
    model = load_model(run / "final")
    x = torch.zeros(1, 3, 16, 16)
    assert model(x, torch.ones(1), torch.zeros(1, 16, 32)).shape == x.shape

    capsys.readouterr()
    assert main([*args, "train.steps=7", "--no-progress"]) == 2  # another config: refused, nothing touched
    assert "train.steps: 5 -> 7" in capsys.readouterr().err
    assert load_config(run / "config.yaml").train.steps == 5 and ck.checkpoint_step(run / "final") == 5
    assert main([*args, "train.steps=7", "--no-progress", "--allow-changed", "train.steps"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 5" in out
    assert ck.checkpoint_step(run / "final") == 7 and load_config(run / "config.yaml").train.steps == 7
    assert main([*args, "train.steps=7", "--no-progress"]) == 0
    assert "run already complete at step 7" in capsys.readouterr().out


def test_bad_configs_are_one_line_user_errors(tmp_path, capsys):
    assert main(["train", "tiny", f"run.dir={tmp_path}", "train.micro_batch=3"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(UserError, match="unknown config key 'train.stepz'"):
        load_config("tiny", ["train.stepz=3"])
    with pytest.raises(UserError, match="not a resumable step checkpoint"):
        trainer = build_trainer(load_config("tiny", [f"run.dir={tmp_path / 'x'}", *SMALL]), progress=False)
        trainer.load(tmp_path)


def test_step_once_by_hand_is_the_loop(tmp_path):
    """`Trainer.step_once` on the loader's batches, driven by hand (as the bench drives it), takes the
    loop's steps: the same weights and EMA, the same logged losses, the same counters."""
    extra = [*SMALL, "train.steps=2", "train.checkpoint_every=100", "sample.prompts=[]", "text.tokenizer_sample=200"]
    final = build_trainer(load_config("tiny", [f"run.dir={tmp_path / 'loop'}", *extra]), progress=False).fit()
    trainer = build_trainer(load_config("tiny", [f"run.dir={tmp_path / 'hand'}", *extra]), progress=False)
    batches = iter(trainer.data)
    results = [trainer.step_once(next(batches)) for _ in range(2)]
    assert (trainer.step, trainer.samples_seen, trainer.nonfinite_total) == (2, 8, 0)
    assert not any(r.skipped for r in results) and all(r.shared == [] for r in results)
    logged = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r.values["loss"] for r in results] == [row["loss"] for row in logged]  # one step per log line
    assert [r.values["grad_norm"] for r in results] == [row["grad_norm"] for row in logged]
    raw, ema = ck.load_tensors(final, "transformer.safetensors"), ck.load_tensors(final, "transformer_ema.safetensors")
    assert all(torch.equal(v, raw[k]) for k, v in trainer.transformer.state_dict().items())
    assert all(torch.equal(trainer.ema.shadow[f"transformer.{k}"], v) for k, v in ema.items())


def test_per_sample_draws_depend_only_on_the_sample_number():
    cfg = load_config("tiny")
    draws = build_denoiser(cfg).draws
    keep, t, noise = draws(range(10, 14), (3, 4, 4), torch.device("cpu"))
    k2, t2, n2 = draws(range(12, 16), (3, 4, 4), torch.device("cpu"))
    assert torch.equal(t[2:], t2[:2]) and torch.equal(noise[2:], n2[:2]) and torch.equal(keep[2:], k2[:2])
    assert not torch.equal(noise[0], noise[1])
    assert ((t > 0) & (t < 1)).all()


@pytest.mark.parametrize("wrap", ["checkpoint", "compile"])
def test_block_wrappers_keep_names_outputs_and_gradients(wrap):
    torch.manual_seed(0)
    plain = build_transformer(**preset("tiny"))
    wrapped = copy.deepcopy(plain)
    if wrap == "checkpoint":
        parallel.checkpoint_blocks(wrapped)
    else:
        parallel.compile_blocks(wrapped, backend="eager")  # the wrapping, without a C++ toolchain
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x, t, txt = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 32)
    for m in (plain, wrapped):
        m(x, t, txt).square().mean().backward()
    assert torch.allclose(wrapped(x, t, txt), plain(x, t, txt), atol=1e-6)
    for (n, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_init_from_a_run_directory_loads_weights_and_ema(tmp_path, finished_run):
    first = finished_run / "final"  # 2 steps of the tiny config with SMALL
    second = build_trainer(load_config("tiny", [f"run.dir={tmp_path / 'b'}", *SMALL, f"init_from={finished_run}"]),
                     progress=False)
    second.checkpointer.resume_or_init()
    raw, ema = ck.load_tensors(first, "transformer.safetensors"), ck.load_tensors(first, "transformer_ema.safetensors")
    assert all(torch.equal(v, raw[k]) for k, v in second.transformer.state_dict().items())
    assert all(torch.equal(second.ema.shadow[f"transformer.{k}"], v) for k, v in ema.items())
    assert not torch.equal(raw["final_layer.linear.weight"], ema["final_layer.linear.weight"])
    assert second.step == 0


def test_compiled_trainer_steps_equal_eager_without_recompiles(monkeypatch):
    """Through the trainer with TREAD on: compiled blocks (static shapes) give the eager run's weights
    within fp32 tolerance; the 4 blocks share one graph per token count (dense, routed span), built
    in the first step, and later steps build none. `aot_eager` traces and differentiates like
    inductor without its C++ code generation (which costs minutes of CPU; the benchmark measures it)."""
    from daybreak.bench.harness import BenchRun

    monkeypatch.setattr(parallel, "compile_blocks", functools.partial(parallel.compile_blocks, backend="aot_eager"))
    overrides = ["train.micro_batch=2", "data.image_size=16", "tread.enabled=true", "tread.start=1", "tread.end=2"]
    runs = {}
    for mode in ("false", "true"):
        run = BenchRun(load_config("tiny", [*overrides, f"train.compile={mode}"]))
        assert run.trainer.compiled == (mode == "true")
        start = [p.detach().clone() for p in run.trainer.transformer.parameters()]
        before = parallel.compiled_graphs()
        run.step()
        first = parallel.compiled_graphs() - before
        run.step()
        run.step()
        runs[mode] = run.trainer.transformer, first, parallel.compiled_graphs() - before, start
    (eager, none, _, start), (compiled, first, total, _) = runs["false"], runs["true"]
    assert none == 0 and first == 2 and total == 2
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert max((p - q).abs().max() for p, q in zip(eager.parameters(), start)) > 1e-3  # 1e-5 is tight
