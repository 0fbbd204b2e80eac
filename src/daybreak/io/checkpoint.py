"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

Two layouts, both a `CKPT` everywhere (`load_tensors` reads either):

consolidated (`final/`, `daybreak convert` output; what export and `load_model` read directly):
  config.yaml                     the fully resolved config of the run
  transformer.safetensors         raw transformer weights
  transformer_ema.safetensors     EMA transformer weights (what sampling and export use)
  text_encoder[_ema].safetensors  only when the text encoder is trained with the model (demo)
  recipe.safetensors              trainable recipe parts (REPA projector, SPRINT fusion); never exported
  meta.json                       step and a short summary

sharded (`checkpoints/step_XXXXXXX/`, any world size; torch.distributed.checkpoint):
  .metadata, __R_0.distcp         DCP: "model.*" (transformer, text_encoder, recipe), "ema.*", "optim.*"
  trainer.pt                      step, sample counter, LR schedules, EMA settings, data-loader position
  rng/rank_RRRRR.pt               each rank's generator states
  config.yaml, meta.json

DCP stores every tensor with its global shape and offsets, so a sharded checkpoint loads onto any
world size (a single process included) and `load_tensors` can pull one part out of it without a
process group. A kill at any moment leaves either the old set of complete directories or the new
one: the rename is atomic on POSIX filesystems, and a stray `.tmp-*` directory is ignored and
cleaned up by `prune`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from daybreak.errors import UserError

STEP_RE = re.compile(r"^step_(\d{7})$")

# consolidated file name -> prefix of its tensors inside a sharded checkpoint
SHARDED_PREFIX = {
    "transformer.safetensors": "model.transformer.",
    "transformer_ema.safetensors": "ema.transformer.",
    "text_encoder.safetensors": "model.text_encoder.",
    "text_encoder_ema.safetensors": "ema.text_encoder.",
    "recipe.safetensors": "model.recipe.",
}


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def _fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def publish(tmp: Path, dest: Path) -> Path:
    """Make the complete directory `tmp` appear as `dest` in one rename (replacing an older `dest`)."""
    _fsync_tree(tmp)
    if dest.exists():  # e.g. replacing `final/`: move the old one aside first, then swap
        old = dest.parent / f".tmp-old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
    return dest


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
    return publish(tmp, dest)


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


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a complete checkpoint was written at, or None when there is none at `ckpt`."""
    meta = Path(ckpt) / "meta.json"
    return json.loads(meta.read_text()).get("step") if meta.is_file() else None


def check_checkpoint(ckpt: str | Path) -> Path:
    p = Path(ckpt)
    if not p.is_dir() or not (p / "config.yaml").is_file():
        raise UserError(f"checkpoint '{ckpt}' not found (expected a directory with config.yaml, e.g. runs/NAME/final)")
    return p


def resolve_source(source: str | Path) -> Path:
    """A checkpoint directory, or a run directory standing for its `final/` checkpoint."""
    p = Path(source)
    if not (p / "meta.json").is_file() and (p / "final" / "meta.json").is_file():
        p = p / "final"
    return check_checkpoint(p)


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every call without a process group; alone is a normal way to run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def dcp_load(state: dict, ckpt: Path, dist, what: str) -> None:
    """Load a sharded checkpoint into `state` in place (resharding to this world size), or a UserError."""
    import torch.distributed.checkpoint as dcp

    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt), process_group=dist.checkpoint_group(), no_dist=not dist.enabled)
    except Exception as e:  # DCP wraps a mismatch in a multi-page CheckpointException
        raise UserError(f"{what}: '{ckpt}' does not match this run's parameters "
                        f"({str(e).strip().splitlines()[-1][:200]})") from None


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / ".metadata").is_file()


def read_sharded(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` of a sharded checkpoint (prefix stripped), read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if state:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def has_tensors(ckpt: Path, name: str) -> bool:
    """Whether checkpoint `ckpt` holds the part `name` (e.g. "text_encoder.safetensors"), in either layout."""
    ckpt = Path(ckpt)
    if (ckpt / name).is_file():
        return True
    if name not in SHARDED_PREFIX or not is_sharded(ckpt):
        return False
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return any(k.startswith(SHARDED_PREFIX[name]) for k in keys)


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    """One part of a checkpoint as full CPU tensors, from a consolidated file or a sharded checkpoint."""
    path = Path(ckpt) / name
    if path.is_file():
        return load_file(str(path))
    if name in SHARDED_PREFIX and is_sharded(Path(ckpt)):
        found = read_sharded(Path(ckpt), SHARDED_PREFIX[name])
        if found:
            return found
    raise UserError(f"checkpoint '{ckpt}' has no {name}")


def convert_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint's weights (raw, EMA, text tower, recipe) in the consolidated layout."""
    src = check_checkpoint(src)
    if not is_sharded(src):
        raise UserError(f"'{src}' is already a consolidated checkpoint (no DCP .metadata)")
    files: dict[str, Any] = {"config.yaml": (src / "config.yaml").read_text()}
    for name, prefix in SHARDED_PREFIX.items():
        tensors = read_sharded(src, prefix)
        if tensors:
            files[name] = tensors
    meta = json.loads((src / "meta.json").read_text()) if (src / "meta.json").is_file() else {}
    return write_checkpoint(Path(out), files, {**meta, "layout": "consolidated", "converted_from": str(src)})


class ShardedSave:
    """One sharded checkpoint being written: every rank writes its shards (and RNG) under a shared
    temporary directory; rank 0 publishes it under its final name once all shards are on disk.

    Synchronous by default. With `async_save` the tensors are staged to CPU memory and written by
    a background thread while training goes on; `poll()` publishes as soon as the write is done
    (only rank 0 touches directory names, and its DCP future completes only after every rank's
    data and the metadata are written), `wait()` blocks until then.
    """

    def __init__(self, dest: Path, state: dict, files: dict[str, Any], rng: bytes, meta: dict, dist,
                 async_save: bool = False) -> None:
        import torch.distributed.checkpoint as dcp

        self.dest, self.meta, self.dist = Path(dest), meta, dist
        self.tmp = self.dest.parent / f".tmp-{self.dest.name}"
        if dist.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)  # a leftover of a killed save of this step
            (self.tmp / "rng").mkdir(parents=True)
            for name, obj in files.items():
                if name.endswith(".pt"):
                    torch.save(obj, self.tmp / name)
                else:
                    (self.tmp / name).write_text(obj)
        dist.barrier()
        (self.tmp / "rng" / f"rank_{dist.rank:05d}.pt").write_bytes(rng)
        kwargs = dict(checkpoint_id=str(self.tmp), process_group=dist.checkpoint_group(), no_dist=not dist.enabled)
        with _single_process_ok():
            self.future = dcp.async_save(state, **kwargs) if async_save else dcp.save(state, **kwargs)
        self.published = False
        if not async_save:
            self.future = None
            self._publish()
            dist.barrier()

    def _publish(self) -> None:
        if self.dist.is_main and not self.published:
            (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))
            publish(self.tmp, self.dest)
        self.published = True

    def poll(self) -> bool:
        """Publish if the background write has finished; says whether the checkpoint is published."""
        if not self.published and self.dist.is_main and self.future.done():
            self.future.result()
            self._publish()
        return self.published

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
        self._publish()
        self.dist.barrier()
