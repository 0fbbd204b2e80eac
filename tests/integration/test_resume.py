"""Exact resume and the run's guards: a run SIGKILLed mid-save resumes from its newest complete
checkpoint and ends bitwise equal to an uninterrupted run; SIGTERM checkpoints at the next step
boundary; non-finite steps are skipped and counted, and too many in a row stop the run."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from daybreak.errors import UserError
from daybreak.io import checkpoint as ck
from daybreak.training.logger import read_metrics
from helpers import SMALL, Tap, max_diff, tiny, weights
from daybreak.run import build_trainer

KILL_DURING_STEP_9_SAVE = """
import os, signal, sys
import daybreak.io.checkpoint as ck
publish = ck.publish
def killing_publish(tmp, dest):
    if dest.name == "step_0000009":  # shards of step 9 on disk, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return publish(tmp, dest)
ck.publish = killing_publish
from daybreak.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_matches_uninterrupted_run_bitwise(tmp_path, capsys):
    steps = ["train.steps=12", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    reference = build_trainer(tiny(tmp_path / "straight", *steps), progress=False).fit()

    run = tmp_path / "killed"
    args = ["train", "tiny", f"run.dir={run}", *SMALL, *steps, "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_STEP_9_SAVE, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in ck.list_checkpoints(run)] == [3, 6]
    assert list((run / "checkpoints").glob(".tmp-step_0000009-*/.metadata"))  # complete shards, never published

    capsys.readouterr()
    final = build_trainer(tiny(run, *steps), progress=False).fit()  # the same command again
    assert "resumed from step 6" in capsys.readouterr().out
    a, b = weights(reference), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)
    assert not list((run / "checkpoints").glob(".tmp-step_0000009*"))  # cleaned when step 9 was rewritten
    # the step checkpoints read like consolidated ones, and convert to the same tensors
    converted = ck.convert_checkpoint(run / "checkpoints" / "step_0000012", tmp_path / "converted")
    c = weights(converted)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_sigterm_checkpoints_at_the_next_step_boundary(tmp_path):
    trainer = build_trainer(tiny(tmp_path / "run", "train.steps=10", "train.checkpoint_every=100"), progress=False)

    def terminate(i, batch):
        if i == 2:  # during the third step
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.data = Tap(trainer.data, terminate)
    path = trainer.fit()
    assert path.name == "step_0000003" and ck.checkpoint_step(path) == 3
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    trainer = build_trainer(tiny(tmp_path / "skip", "train.steps=4", "train.checkpoint_every=100"), progress=False)
    trainer.data = Tap(trainer.data, lambda i, b: b.update(pixels=torch.full(b["pixels"].shape, float("nan"))) if i == 1 else None)
    final = trainer.fit()
    rows = read_metrics(tmp_path / "skip")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["skipped_nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in weights(final).values())

    trainer = build_trainer(tiny(tmp_path / "stop", "train.steps=10", "train.max_nonfinite=2"), progress=False)
    trainer.data = Tap(trainer.data, lambda i, b: b.update(pixels=torch.full(b["pixels"].shape, float("nan"))) if i >= 3 else None)
    with pytest.raises(UserError, match="2 non-finite steps in a row at step 3"):
        trainer.fit()
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "stop")] == [3]


def test_time_limit_ends_the_run_with_a_final_checkpoint(tmp_path):
    final = build_trainer(tiny(tmp_path / "run", "train.steps=50", "train.time_limit_minutes=0.000001"), progress=False).fit()
    assert final.name == "final" and ck.checkpoint_step(final) == 1
    assert ck.checkpoint_step(tmp_path / "run" / "checkpoints" / "step_0000001") == 1
