"""Host–device syncs forced by daybreak's own code, counted on any device (a CPU included).

On a GPU the host queues work and runs ahead; a call that needs a device value on the host makes
it wait for everything queued before it. `torch.cuda.set_sync_debug_mode` reports those on CUDA
only; `SyncCounter` counts the Python calls that force one, wherever the tensors live, so the CPU
tests hold the step to its budget: `.item()`, `.tolist()`, `bool(tensor)`, `.cpu()`, a copy to
another device without `non_blocking=True` (`.to`, `.copy_`) and `torch.tensor(data, device=)`
(host data copied to the device: counted whatever the device, so a CPU run sees it too). Only calls made from daybreak's modules count: torch's own host-side bookkeeping
(the optimizers' CPU step counters) never touches the device. `.numpy()` is not counted: it
refuses device tensors, so it cannot sync.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from pathlib import Path

import torch

_SRC = str(Path(__file__).resolve().parents[1])  # .../daybreak
_METHODS = ("item", "tolist", "__bool__", "cpu")


def _caller_in_daybreak(depth: int = 2) -> str | None:
    """'file:line' of the first caller outside this module when it is in daybreak, else None."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(_SRC):
        return None
    return f"{Path(frame.f_code.co_filename).relative_to(_SRC)}:{frame.f_lineno}"


def _crosses(t: torch.Tensor, args, kwargs) -> bool:
    """Whether `t.to(*args, **kwargs)` copies to another device without non_blocking."""
    if kwargs.get("non_blocking") or (len(args) > 1 and isinstance(args[1], bool) and args[1]):
        return False
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, (torch.device, str)):
            target = a
        elif isinstance(a, torch.Tensor):
            target = a.device
    return target is not None and torch.device(target).type != t.device.type


class SyncCounter(contextlib.AbstractContextManager):
    """`with SyncCounter() as c: ...` then `c.count` and `c.sites` ({'file:line': n})."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def reset(self) -> None:
        self.sites.clear()

    def _note(self) -> None:
        site = _caller_in_daybreak(3)
        if site is not None:
            self.sites[site] += 1

    def __enter__(self) -> "SyncCounter":
        counter = self

        def wrap(name):
            original = getattr(torch.Tensor, name)

            def method(self, *args, **kwargs):
                counter._note()
                return original(self, *args, **kwargs)

            self._saved[name] = original
            setattr(torch.Tensor, name, method)

        for name in _METHODS:
            wrap(name)
        to, copy_, tensor = torch.Tensor.to, torch.Tensor.copy_, torch.tensor
        self._saved |= {"to": to, "copy_": copy_, "tensor": tensor}

        def to_(t, *args, **kwargs):
            if _crosses(t, args, kwargs):
                counter._note()
            return to(t, *args, **kwargs)

        def copy(t, src, non_blocking=False):
            if not non_blocking and src.device.type != t.device.type:
                counter._note()
            return copy_(t, src, non_blocking)

        def new_tensor(data, *args, **kwargs):
            if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                counter._note()
            return tensor(data, *args, **kwargs)

        torch.Tensor.to, torch.Tensor.copy_, torch.tensor = to_, copy, new_tensor
        return self

    def __exit__(self, *exc) -> None:
        torch.tensor = self._saved.pop("tensor")
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
