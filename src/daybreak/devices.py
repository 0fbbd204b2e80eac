"""Which device a process computes on, and the one CPU setting every daybreak process needs."""

from __future__ import annotations

import warnings

import torch


def flush_denormals(device: torch.device) -> None:
    """On CPUs, treat subnormal floats as zero. Zero-initialised modulation layers and Muon's momentum
    make tiny values common early in training, and x86 arithmetic on subnormals is ~100x slower:
    measured here, the demo's step went from 20 s to 0.3 s. GPUs flush them already."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        # numpy notices and warns once per dtype; the flushing is intended.
        warnings.filterwarnings("ignore", message="The value of the smallest subnormal")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
