"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

Layout of a checkpoint directory (what `CKPT` means everywhere):
  config.yaml                     the fully resolved config of the run
  transformer.safetensors         raw transformer weights
  transformer_ema.safetensors     EMA transformer weights (what sampling and export use)
  text_encoder[_ema].safetensors  only when the text encoder is trained with the model (demo)
  recipe.safetensors              trainable recipe parts (REPA projector, SPRINT fusion); never exported
  trainer.pt                      optimizer + schedule, EMA state, step, RNG, data-loader position
  meta.json                       step and a short summary, written last

A kill at any moment leaves either the old set of complete directories or the new one: the rename
is atomic on POSIX filesystems, and a stray `.tmp-*` directory is ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from daybreak.errors import UserError

STEP_RE = re.compile(r"^step_(\d{7})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def write_checkpoint(dest: Path, files: dict[str, Any], meta: dict) -> Path:
    """Write `files` (name → tensor dict for .safetensors, any object for .pt, str for text) to `dest`, atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    for name, obj in files.items():
        path = tmp / name
        if name.endswith(".safetensors"):
            _save_tensors(obj, path)
        elif name.endswith(".pt"):
            torch.save(obj, path)
        else:
            path.write_text(obj)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if dest.exists():  # replacing `final/`: move the old one aside first, then swap
        old = dest.parent / f".tmp-old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = []
    for p in ckdir.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints; remove leftovers of interrupted writes."""
    ckdir = Path(run_dir) / "checkpoints"
    for stale in ckdir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for _, p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def check_checkpoint(ckpt: str | Path) -> Path:
    p = Path(ckpt)
    if not p.is_dir() or not (p / "config.yaml").is_file():
        raise UserError(f"checkpoint '{ckpt}' not found (expected a directory with config.yaml, e.g. runs/NAME/final)")
    return p


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(ckpt) / name
    if not path.is_file():
        raise UserError(f"checkpoint '{ckpt}' has no {name}")
    return load_file(str(path))
