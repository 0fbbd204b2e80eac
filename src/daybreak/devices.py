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
    """The device `train.device` names (cuda: this rank's GPU), or a one-line error when this machine has none such."""
    from daybreak.errors import UserError

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'train.device': '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        found = torch.cuda.device_count()
        raise UserError(f"config key 'train.device'={name}: this machine has {found or 'no'} CUDA GPU"
                        f"{'s' if found != 1 else ''}" + (f" (cuda:0..cuda:{found - 1})" if found else ""))
    if dev.type not in ("cpu", "cuda"):
        avail = getattr(torch, dev.type, None)
        if avail is None or not getattr(avail, "is_available", lambda: False)():
            raise UserError(f"config key 'train.device'={name}: no {dev.type} device on this machine")
    return dev


def fast_fp32_matmuls(device: torch.device) -> None:
    """On CUDA, fp32 matmuls and convolutions on TF32 tensor cores (matmul precision "high"): what
    stays fp32 under autocast (the loss, the frozen networks' fp32 parts) then runs at ~8x the
    plain fp32 rate, 10-bit mantissa products with fp32 accumulation. Elsewhere nothing changes."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def frozen_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype of frozen networks (teachers, LPIPS, a pretrained text tower) on `device`:
    bf16 on CUDA, fp32 elsewhere (bf16 matmuls are 50-130x slower than fp32 on CPUs without AMX)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: on CUDA it is pinned and copied
    non-blocking (a copy from pageable memory synchronises the stream first); elsewhere a plain `.to`."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
