"""Kill anywhere: one training run is SIGKILLed at six moments — inside a step, with a step
checkpoint's shards on disk but not yet published, half-way through a metrics line, in a sample
grid, while `final/` is being written, and in the final grid — each time resumed with the same
command, and it ends bitwise equal to the uninterrupted run (weights, EMA, the final grid).

The kill moments are drawn from a seeded generator (which forward call, which log line, which file
of final/); the order of the kinds follows the run's course, so each one is reached. Each killed
run is a forked copy of this process (a fresh interpreter costs more than the run); the last one,
which completes, is `python -m daybreak` as typed.
"""

import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import SMALL, tiny, weights
from PIL import Image

from daybreak.io import checkpoint as ck
from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

def killed_at(kind: str, n: int, args: list[str]) -> None:
    """In a forked child: run `daybreak ARGS`, SIGKILLing the process at the n-th event of `kind`."""
    import daybreak.io.checkpoint as ck
    from daybreak.cli import main
    from daybreak.training import logger, trainer

    seen = [0]

    def due() -> bool:
        seen[0] += 1
        return seen[0] == n

    def wrap(owner, name, when):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            if when(*a, **k) and due():
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)
        setattr(owner, name, wrapper)

    if kind == "step":  # inside a step: the n-th micro-batch forward
        wrap(trainer.Trainer, "forward_loss", lambda *a, **k: True)
    elif kind == "publish":  # a step checkpoint complete on disk, not renamed yet
        wrap(ck, "publish", lambda tmp, dest, *r: dest.name.startswith("step_"))
    elif kind == "final-write":  # part of final/'s files written
        wrap(ck, "_save_tensors", lambda *a: True)
    elif kind == "grid":  # in the n-th sample grid
        wrap(trainer.Trainer, "sample_grid", lambda *a: True)
    elif kind == "log":  # half of the n-th metrics line written
        original = logger.RunLogger.log

        def log(self, step, values):
            if self.enabled and due():
                with open(self.path, "a") as f:
                    f.write('{"step": ' + str(step) + ', "lo')
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, step, values)
        logger.RunLogger.log = log
    os._exit(main(args))


def run_forked(kind: str, n: int, args: list[str]) -> int:
    """The exit code of `killed_at` in a forked process (no interpreter start-up: torch is imported)."""
    proc = mp.get_context("fork").Process(target=killed_at, args=(kind, n, args))
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail(f"{kind}:{n} did not end within 300 s")
    return proc.exitcode


STEPS = ["train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.sample_every=4",
         "sample.prompts=[a red circle on the left]", "sample.steps=1"]


def test_sigkill_at_six_moments_then_the_same_command_ends_bitwise_equal(tmp_path):
    reference = build_trainer(tiny(tmp_path / "straight", *STEPS), progress=False).fit()

    rng = random.Random(13)
    kills = [("step", rng.randint(3, 6)),  # forward calls 3..6: steps 2..3 (2 micro batches a step)
             ("publish", 1), ("log", rng.randint(1, 2)), ("grid", 1),  # the step-4 grid
             ("final-write", rng.randint(1, 3)), ("grid", 1)]  # then the final grid, after final/
    run = tmp_path / "killed"
    args = ["train", "tiny", f"run.dir={run}", *SMALL, *STEPS, "--no-progress"]
    for kind, n in kills:
        assert run_forked(kind, n, args) == -signal.SIGKILL, (kind, n)
        if kind == "publish":
            assert list((run / "checkpoints").glob(".tmp-step_*/.metadata"))  # complete shards, never published
    assert ck.checkpoint_step(run / "final") == 8 and not (run / "samples" / "final.png").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the last run as a user types it
    proc = subprocess.run([sys.executable, "-m", "daybreak", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run already complete at step 8" in proc.stdout
    a, b = weights(reference), weights(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for grid in ("step_0000004.png", "final.png"):
        assert Image.open(tmp_path / "straight" / "samples" / grid).tobytes() == Image.open(run / "samples" / grid).tobytes()
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4, 6, 8]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list(run.glob(".tmp-*"))
    assert {r["step"] for r in read_metrics(run)} == set(range(1, 9))  # the half line is skipped
