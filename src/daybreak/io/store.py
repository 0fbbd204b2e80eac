"""Atomic files and one content-addressed store.

Every file daybreak writes for later reading appears whole or not at all: it is written under a
temporary name in the same directory, flushed, and renamed (atomic on POSIX filesystems), so a
killed process never leaves a half-written JSON, cache entry or statistics file behind, and any
number of processes may write the same entry at once.

`ContentStore` is the one cache layout behind the text-embedding cache, the latent cache and the
reference-statistics cache: an entry's name is the sha256 of the parts that identify it, stored
as one file under a two-hex-digit fan-out directory (so no directory holds millions of files).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def check_output(path: str | os.PathLike, *, directory: bool, force: bool = False) -> Path:
    """Refuse, in one line, an output that cannot be created or would replace something: an existing
    file, or a non-empty directory (unless `force`), the other kind in the way, or an ancestor that is
    a file. Nothing is created here."""
    from daybreak.errors import UserError

    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create '{path}': '{parent}' is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
                raise UserError(f"cannot create '{path}': no permission to write in '{parent}'")
            break
    if not path.exists():
        return path
    if directory and not path.is_dir():
        raise UserError(f"output '{path}' is a file; a directory is needed here")
    if not directory and path.is_dir():
        raise UserError(f"output '{path}' is a directory; a file name is needed here")
    if not force and (not directory or any(path.iterdir())):
        what = "exists" if not directory else "exists and is not empty"
        raise UserError(f"output '{path}' {what}; choose another or add --force to replace it")
    return path


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the user's umask (what
    `mkstemp` and safetensors' 0o600 would otherwise narrow, hiding weights from a shared cluster's team)."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)  # elsewhere: the classic read-by-setting, set straight back
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create `path` through `write(tmp_path)` on a temporary file beside it, then one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2))


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """A safetensors file of CPU copies of `tensors`."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp))


class ContentStore:
    """Files named by the sha256 of their identifying parts, under `dir/<2 hex>/<digest><suffix>`."""

    def __init__(self, dir: str | os.PathLike, suffix: str = ".safetensors") -> None:
        self.dir = Path(dir).expanduser()
        self.suffix = suffix
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def digest(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def path(self, *parts: str) -> Path:
        d = self.digest(*parts)
        return self.dir / d[:2] / f"{d}{self.suffix}"

    def __contains__(self, parts: tuple[str, ...]) -> bool:
        return self.path(*parts).exists()

    def get_tensors(self, *parts: str) -> dict[str, torch.Tensor] | None:
        path = self.path(*parts)
        return load_file(str(path)) if path.exists() else None

    def put_tensors(self, tensors: dict[str, torch.Tensor], *parts: str) -> Path:
        return write_tensors(self.path(*parts), tensors)
