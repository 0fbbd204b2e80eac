"""A run's checkpoints, as torchtitan's `CheckpointManager` owns them: resume, step checkpoints
(written in the background when `train.async_checkpoint`), their publication and pruning, the save
a stop signal or the time limit asks for, and the consolidated `final/`.

The state itself (what a checkpoint holds, how it is written and read) is `TrainState`'s. What the
Checkpointer adds is the protocol between ranks, which costs no host sync of its own: each step, its
`flags` (a stop signal this rank received, the time limit passed, this rank's part of an async write
done) ride in the step's one all-reduce, and `agree` acts on their sums, so every rank publishes,
saves and stops at the same step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

from daybreak.config import Config
from daybreak.io import checkpoint as ck
from daybreak.training.distributed import Dist
from daybreak.training.state import TrainState

# the stop signals a run saves on: SIGTERM (schedulers' preemption notice) and SIGUSR1 (Slurm's --signal)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TIME_LIMIT = "time limit"


class Checkpointer:
    def __init__(self, state: TrainState, cfg: Config, dist: Dist, log=print) -> None:
        self.state, self.cfg, self.dist, self.log = state, cfg, dist, log
        self.run_dir = Path(cfg.run.dir)
        self.dir = self.run_dir / "checkpoints"
        self.final = self.run_dir / "final"
        self._pending: ck.ShardedSave | None = None
        self._signal = 0  # the last stop signal this process received
        self._deadline = math.inf

    # ------------------------------------------------------------------ start
    def resume_or_init(self) -> None:
        """Load the run directory's newest complete step checkpoint, else `init_from`'s weights."""
        latest = ck.latest_complete(self.run_dir, self.dist, log=self.log)  # damaged ones: one line, skipped
        if latest is not None:
            self.state.load(latest)
            self.log(f"resumed from step {self.state.progress.step}")
        elif self.cfg.init_from:
            self.state.init_from(self.cfg.init_from, optimizer=self.cfg.init_optimizer)

    def complete(self) -> bool:
        """Whether the run has reached `train.steps` and `final/` holds that step."""
        step = self.state.progress.step
        return step >= self.cfg.train.steps and ck.checkpoint_step(self.final) == step

    @contextlib.contextmanager
    def watching(self):
        """While training: the stop signals are caught (the step's flags carry them to every rank) and the
        time limit runs from now."""
        def caught(signum, frame) -> None:
            self._signal = signum

        minutes = self.cfg.train.time_limit_minutes
        self._deadline = time.monotonic() + 60 * minutes if minutes > 0 else math.inf
        handlers = {s: signal.signal(s, caught) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ the per-step agreement
    def flags(self) -> tuple[float, ...]:
        """This rank's view, to be summed over ranks by the step's all-reduce: SIGTERM received, SIGUSR1
        received, past the time limit, this rank's part of the pending async write done."""
        written = self._pending is not None and self._pending.done()
        return (float(self._signal == signal.SIGTERM), float(self._signal == signal.SIGUSR1),
                float(time.monotonic() > self._deadline), float(written))

    def agree(self, summed: list[float]) -> str | None:
        """Act on `flags` summed over ranks: publish the pending write once every rank has written it; the
        reason to stop (a signal's name, SIGTERM's when any rank got one, or `TIME_LIMIT`), or None."""
        term, usr1, late, written = summed
        if self._pending is not None and written == self.dist.world_size:
            self._pending.finish()
            self._published()
        if term or usr1:
            return signal.Signals(signal.SIGTERM if term else signal.SIGUSR1).name
        return TIME_LIMIT if late else None

    # ------------------------------------------------------------------ step checkpoints
    def path(self, step: int) -> Path:
        return self.dir / ck.step_dir_name(step)

    def at_step(self, step: int) -> None:
        """The step checkpoint every `train.checkpoint_every` steps and at the last step; in the background
        when `train.async_checkpoint`, except the last, which `final/` waits for anyway."""
        t = self.cfg.train
        if step % t.checkpoint_every == 0 or step == t.steps:
            self.save(step, async_save=t.async_checkpoint and step < t.steps)

    def save(self, step: int, async_save: bool = False) -> Path:
        """A sharded step checkpoint of the whole training state (every rank takes part)."""
        self.wait()
        dest = self.path(step)
        self._pending = self.state.save(dest, self.cfg.to_yaml(), self.cfg.run.name, async_save)
        if self._pending.published:
            self._published()
        return dest

    def save_to_stop(self, step: int) -> Path:
        """The checkpoint a stop leaves: this step's, written unless it already is (or is being), and waited for."""
        dest = self.path(step)
        if not ((self._pending is not None and self._pending.dest == dest) or (dest / "meta.json").is_file()):
            self.save(step)
        self.wait()
        return dest

    def wait(self) -> None:
        """Block until the pending write (if any) is published (every rank)."""
        if self._pending is not None:
            self._pending.wait()
            self._published()

    def _published(self) -> None:
        self._pending = None
        if self.dist.is_main:
            ck.prune(self.run_dir, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ the end
    def consolidate(self) -> Path:
        """`final/`: the full weights gathered on rank 0, once every step checkpoint is published."""
        self.wait()
        return self.state.consolidate(self.final, self.cfg.to_yaml(), self.cfg.run.name)
