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
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import SMALL, tiny, weights
from PIL import Image

from daybreak.io import checkpoint as ck
from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics


def killed_at(kind: str, n: int, args: list[str]) -> None:
    """In a forked child: run `daybreak ARGS`, SIGKILLing the process at the n-th event of `kind`."""
    import daybreak.io.checkpoint as ck
    from daybreak.cli import main
    from daybreak.evaluate import periodic
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
        wrap(periodic.SampleGrids, "grid", lambda *a: True)
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

    proc = subprocess.run([sys.executable, "-m", "daybreak", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run already complete at step 8" in proc.stdout
    a, b = weights(reference), weights(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for grid in ("step_0000004.png", "final.png"):
        assert Image.open(tmp_path / "straight" / "samples" / grid).tobytes() == Image.open(run / "samples" / grid).tobytes()
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4, 6, 8]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list(run.glob(".tmp-*"))
    assert {r["step"] for r in read_metrics(run)} == set(range(1, 9))  # the half line is skipped


# -------------------------------------------------------------------------- signals, the run lock, file modes
#
# What a process does to a run directory (counted in docs/reliability.md).
PROCESS_CASES = [
    ("run lock", "a second process on a running run's directory is refused in one line naming the holder's PID"),
    ("signal", "SIGTERM: the step checkpoint is saved and verifies, exit 143"),
    ("signal", "SIGUSR1: the step checkpoint is saved, exit 138"),
    ("signal", "Ctrl-C (SIGINT) while a step checkpoint is published: one line, exit 130, no temporary left"),
    ("run lock", "kill -9: the lock is free again and the same command resumes"),
    ("file mode", "final/ and config.yaml follow the user's umask (027: 0640), not safetensors' 0600"),
]


def _child(args: list[str], log: str, interrupt_publish: bool) -> None:
    """A forked `daybreak ARGS` with its stdout and stderr in `log`; with `interrupt_publish`, Ctrl-C lands
    while its first step checkpoint is complete on disk and not yet renamed."""
    import daybreak.io.checkpoint as ck
    from daybreak.cli import main

    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupt_publish:
        publish = ck.publish

        def interrupted(tmp, dest, *rest):
            if dest.name.startswith("step_"):
                os.kill(os.getpid(), signal.SIGINT)
            return publish(tmp, dest, *rest)
        ck.publish = interrupted
    code = main(args)
    sys.stderr.flush()
    os._exit(code)


def _rows(run) -> int:
    return len(read_metrics(run)) if (run / "metrics.jsonl").is_file() else 0


def _start(args, log, interrupt_publish=False):
    """A forked run, once it has logged a step beyond what the run directory held."""
    before = _rows(args.run)
    proc = mp.get_context("fork").Process(target=_child, args=(args.argv, str(log), interrupt_publish))
    proc.start()
    deadline = time.monotonic() + 240
    while not interrupt_publish and _rows(args.run) <= before and proc.exitcode is None:
        assert time.monotonic() < deadline, "the run did not reach a step within 240 s"
        time.sleep(0.05)
    return proc


def _end(proc) -> int:
    proc.join(timeout=240)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail("the run did not end within 240 s")
    return proc.exitcode


def test_signals_exit_codes_lock_and_umask(tmp_path, capsys):
    from types import SimpleNamespace

    import daybreak.run  # noqa: F401  (imported once here, not again in every forked run)
    from daybreak.cli import main
    from transformers import DistilBertModel  # noqa: F401

    run = tmp_path / "run"
    a = SimpleNamespace(run=run, argv=["train", "tiny", f"run.dir={run}", *SMALL, "train.steps=100000", "text.tokenizer_sample=64",
                                       "train.checkpoint_every=3", "--no-progress"])
    first = _start(a, tmp_path / "a.log")
    capsys.readouterr()
    assert main(a.argv) == 2  # this process, while the forked one trains
    err = capsys.readouterr().err
    assert f"run.dir '{run}' is in use by PID {first.pid} on host" in err and len(err.splitlines()) == 1, err

    os.kill(first.pid, signal.SIGTERM)
    assert _end(first) == 128 + signal.SIGTERM
    said = (tmp_path / "a.log").read_text().splitlines()[-1]
    assert said.startswith("daybreak: stopped by SIGTERM; checkpoint ") and "the same command resumes" in said
    ck.verify(ck.list_checkpoints(run)[-1][1])

    second = _start(a, tmp_path / "b.log")
    os.kill(second.pid, signal.SIGUSR1)
    assert _end(second) == 128 + signal.SIGUSR1

    assert _end(_start(a, tmp_path / "c.log", interrupt_publish=True)) == 130
    lines = [line for line in (tmp_path / "c.log").read_text().splitlines() if line.startswith("daybreak")]
    assert lines == ["daybreak: interrupted"] and "Traceback" not in (tmp_path / "c.log").read_text()
    assert not list(run.rglob(".tmp-*"))

    fourth = _start(a, tmp_path / "d.log")
    os.kill(fourth.pid, signal.SIGKILL)
    assert _end(fourth) == -signal.SIGKILL
    last = ck.list_checkpoints(run)[-1][0]
    umask = os.umask(0o027)
    try:
        assert main([*a.argv, f"train.steps={last + 1}", "--allow-changed", "train.steps"]) == 0
    finally:
        os.umask(umask)
    assert f"resumed from step {last}" in capsys.readouterr().out
    assert ck.checkpoint_step(run / "final") == last + 1
    modes = {p.name: p.stat().st_mode & 0o777 for p in [run / "config.yaml", *(run / "final").rglob("*")] if p.is_file()}
    assert set(modes.values()) == {0o640}, modes
