"""Process-group set-up and the few collectives the trainer needs: one process alone, or one per GPU
(or CPU rank) under torchrun.

Every helper is a no-op (or the identity) in a single process, so the trainer has one code path.
Decisions that must be the same on every rank (skip a non-finite step, stop on a signal or the time
limit) are taken from all-reduced values, never from a rank's local view.
"""

from __future__ import annotations

import os
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

    def shared(self, n: int, run):
        """`run(indices)` -> one result per index, on every rank for its share of `range(n)`; rank 0
        gets the `n` results in order, the other ranks None.

        Shares are contiguous and equal in length (the last index repeated to pad them), so every
        rank runs the same forwards, as FSDP's collectives need, and one rank's work is n / world.
        """
        k = -(-n // self.world_size)
        mine = run([min(i, n - 1) for i in range(self.rank * k, (self.rank + 1) * k)])
        if not self.enabled:
            return mine[:n]
        parts = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        return [x for part in parts for x in part][:n] if self.is_main else None

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
    """This rank's generator states (torch CPU/CUDA, numpy, Python) as a safetensors file's bytes: plain
    tensors, which cannot carry code the way a pickle can."""
    import random

    import numpy as np
    from safetensors.torch import save

    _, keys, pos, has_gauss, gauss = np.random.get_state()  # the legacy global generator is MT19937
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy.keys": torch.from_numpy(keys.astype(np.int64)),
               "numpy.ints": torch.tensor([pos, has_gauss], dtype=torch.int64),
               "numpy.gauss": torch.tensor([gauss], dtype=torch.float64),
               "python.state": torch.tensor([version, *internal], dtype=torch.int64),
               "python.gauss": torch.tensor([] if gauss_next is None else [gauss_next], dtype=torch.float64)}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return save(tensors)


def set_rng_state(data: bytes) -> None:
    """Restore what `rng_state` saved; a file with other contents is a ValueError naming what is wrong."""
    import random

    import numpy as np
    from safetensors.torch import load

    t = load(data)
    need = {"torch", "numpy.keys", "numpy.ints", "numpy.gauss", "python.state", "python.gauss"}
    if not need <= set(t):
        raise ValueError(f"not a generator state (missing {sorted(need - set(t))})")
    pos, has_gauss = (int(v) for v in t["numpy.ints"].tolist())
    np.random.set_state(("MT19937", t["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(t["numpy.gauss"][0])))
    state = [int(v) for v in t["python.state"].tolist()]
    gauss_next = float(t["python.gauss"][0]) if t["python.gauss"].numel() else None
    random.setstate((state[0], tuple(state[1:]), gauss_next))
    torch.set_rng_state(t["torch"])
    cuda = [t[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in t))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
