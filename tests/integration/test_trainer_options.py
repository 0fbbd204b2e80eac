"""Options claimed in docs/, tested through the trainer (one process, tiny config, 16 px):
regional compile with the real inductor backend (compiled = eager within fp32 tolerance), bf16
weights, periodic evaluation inside training (EMA weights swapped in, live weights restored
bitwise), aspect-bucket training end to end, loader workers (the same batches as none), and
`init_optimizer` (the optimizer moments of the source checkpoint), `init_from` a diffusers folder."""

import inspect
import shutil

import pytest
import torch
from helpers import tiny, weights

from daybreak.evaluate.periodic import PeriodicEval
from daybreak.io import checkpoint as ck
from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics


def fit(run_dir, *extra):
    return build_trainer(tiny(run_dir, "train.checkpoint_every=100", *extra), progress=False).fit()


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """Two plain steps: the reference the options are compared with."""
    return fit(tmp_path_factory.mktemp("eager") / "run", "train.steps=2")


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_compile_with_inductor_matches_eager(tmp_path, eager):
    from daybreak.training import parallel

    final = fit(tmp_path / "run", "train.steps=2", "train.compile=true")
    assert parallel.compiled_graphs() > 0  # the blocks really went through inductor
    a, b = weights(eager), weights(final)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_bf16_weights_train_and_are_stored_in_bf16(tmp_path):
    final = fit(tmp_path / "run", "train.steps=2", "train.weights_dtype=bf16")
    raw = ck.load_tensors(final, "transformer.safetensors")
    assert {v.dtype for v in raw.values()} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in raw.values())
    assert read_metrics(tmp_path / "run")[-1]["step"] == 2


def test_periodic_eval_sees_the_ema_weights_and_restores_the_live_ones_bitwise(tmp_path):
    trainer = build_trainer(tiny(tmp_path / "run", "train.steps=2", "train.checkpoint_every=100", "eval.every=1",
                                 "eval.num=2", "eval.steps=1", "eval.metrics=[adherence]"), progress=False)
    (watcher,) = [w for w in trainer.watchers if isinstance(w, PeriodicEval)]
    generate, seen = watcher.evaluator.generate, []

    def spy(pipe, **kw):
        live = {k: v.clone() for k, v in trainer.transformer.state_dict().items()}
        seen.append(all(torch.equal(v, trainer.ema.shadow[f"transformer.{k}"]) for k, v in live.items()))
        return generate(pipe, **kw)

    watcher.evaluator.generate = spy
    after = watcher.after_step
    restored = []

    def check(tr, logger):
        before = {k: v.clone() for k, v in tr.transformer.state_dict().items()}
        after(tr, logger)
        restored.append(all(torch.equal(v, tr.transformer.state_dict()[k]) for k, v in before.items())
                        and tr.transformer.training)

    watcher.after_step = check
    trainer.fit()
    assert seen == [True, True] and restored == [True, True]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "eval/adherence" in r] == [1, 2]


def test_aspect_buckets_train_end_to_end(tmp_path):
    final = fit(tmp_path / "run", "train.steps=2", "data.buckets=aspect", "data.image_size=32")
    assert ck.checkpoint_step(final) == 2 and all(torch.isfinite(v).all() for v in weights(final).values())


def test_loader_workers_give_the_same_run(tmp_path, eager):
    final = fit(tmp_path / "run", "train.steps=2", "data.num_workers=2")
    a, b = weights(eager), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_optimizer_takes_the_source_moments(tmp_path):
    src = build_trainer(tiny(tmp_path / "a", "train.steps=2", "train.checkpoint_every=1"), progress=False)
    src.fit()
    step = tmp_path / "a" / "checkpoints" / "step_0000002"
    dst = build_trainer(tiny(tmp_path / "b", f"init_from={step}", "init_optimizer=true"), progress=False)
    dst.checkpointer.resume_or_init()
    for name, opt in src.optim.optimizers.items():
        mine = dst.optim.optimizers[name].state_dict()["state"]
        theirs = opt.state_dict()["state"]
        assert mine.keys() == theirs.keys() and mine
        for i in theirs:
            for k, v in theirs[i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(mine[i][k])), (name, i, k)
    assert dst.step == 0  # the weights and moments, not the position


def test_init_from_a_diffusers_folder_starts_weights_and_ema(tmp_path):
    import daybreak  # noqa: F401  (torchvision fix before diffusers' model imports)
    from diffusers import PRXTransformer2DModel

    trainer = build_trainer(tiny(tmp_path / "run"), progress=False)
    accepted = inspect.signature(PRXTransformer2DModel.__init__).parameters
    torch.manual_seed(1)
    theirs = PRXTransformer2DModel(**{k: v for k, v in trainer.transformer.config.items() if k in accepted})
    theirs.save_pretrained(tmp_path / "released" / "transformer")
    trainer = build_trainer(tiny(tmp_path / "run2", f"init_from={tmp_path / 'released'}"), progress=False)
    trainer.checkpointer.resume_or_init()
    want = theirs.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in trainer.transformer.state_dict().items())
    assert all(torch.equal(trainer.ema.shadow[f"transformer.{k}"], v) for k, v in want.items())
