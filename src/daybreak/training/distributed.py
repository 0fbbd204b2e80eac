"""Process-group set-up and the few collectives the trainer needs: one process alone, or one per GPU
(or CPU rank) under torchrun.

Every helper is a no-op (or the identity) in a single process, so the trainer has one code path.
Decisions that must be the same on every rank (skip a non-finite step, stop on a signal or the time
limit) are taken from all-reduced values, never from a rank's local view.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from daybreak.devices import flush_denormals, pick_device


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    _ckpt_group: object = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a 1-D float tensor on the device); returned for chaining."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


    def checkpoint_group(self):
        """A gloo group for checkpoint I/O (async DCP saves need CPU collectives); None alone."""
        if not self.enabled:
            return None
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo")
        return self._ckpt_group


def init_distributed(device: str = "auto") -> Dist:
    """Reads torchrun's environment; initialises NCCL (GPU) or gloo (CPU) when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    flush_denormals(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rng_state() -> bytes:
    """This rank's generator states (torch CPU/CUDA, numpy, Python), as bytes for a per-rank file."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return pickle.dumps(state)


def set_rng_state(data: bytes) -> None:
    import random

    import numpy as np

    state = pickle.loads(data)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
