"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

Two layouts, both a `CKPT` everywhere (`load_tensors` reads either):

consolidated (`final/`, `daybreak convert` output; what export and `load_model` read directly):
  config.yaml                     the fully resolved config of the run
  transformer.safetensors         raw transformer weights
  transformer_ema.safetensors     EMA transformer weights (what sampling and export use)
  text_encoder[_ema].safetensors  only when the text encoder is trained with the model (demo)
  recipe.safetensors              trainable recipe parts (REPA projector, SPRINT fusion); never exported
  recipe_ema.safetensors          EMA of the recipe parts the sampler runs (SPRINT's fusion and mask token)
  meta.json                       step and a short summary
  manifest.json                   size and sha256 of every other file (both layouts)

sharded (`checkpoints/step_XXXXXXX/`, any world size; torch.distributed.checkpoint):
  .metadata, __R_0.distcp         DCP: "model.*" (transformer, text_encoder, recipe), "ema.*", "optim.*"
  trainer.json                    step, sample counter, LR schedules, EMA settings, data-loader position
  rng/rank_RRRRR.safetensors      each rank's generator states, as tensors
  config.yaml, meta.json, manifest.json

Nothing daybreak reads back can run code: weights and RNG states are safetensors, the trainer state
is JSON, DCP's tensors are read by PyTorch with weights_only=True, and DCP's two pickled pieces
(`.metadata`, optimizer hyper-parameters) go through an allow-listed unpickler and
torch.load(weights_only=True). Every reader first checks the directory against its manifest
(`verify`), so a truncated, missing or changed file is reported before anything is parsed; resume
then falls back to the previous complete step checkpoint (`latest_complete`).

DCP stores every tensor with its global shape and offsets, so a sharded checkpoint loads onto any
world size (a single process included) and `load_tensors` can pull one part out of it without a
process group. A kill at any moment leaves either the old set of complete directories or the new
one: the rename is atomic on POSIX filesystems, and a stray `.tmp-*` directory is ignored and
cleaned up by `prune`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
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
    "recipe_ema.safetensors": "ema.recipe.",
}


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from daybreak.io.store import file_mode

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, file_mode())  # safetensors creates 0o600 files


def _fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def publish(tmp: Path, dest: Path, replace: bool = False) -> Path:
    """Make the complete directory `tmp` appear as `dest` in one rename. An existing `dest` is replaced
    only when it is an earlier checkpoint (its meta.json: written here) or empty, or with `replace`
    (the user's --force); anything else is left as it is and refused."""
    _fsync_tree(tmp)
    if dest.exists():  # e.g. replacing `final/`: move the old one aside first, then swap
        ours = dest.is_dir() and ((dest / "meta.json").is_file() or not any(dest.iterdir()))
        if not (ours or replace):
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"'{dest}' exists and is not a daybreak checkpoint; left as it is (--force replaces it)")
        old = dest.parent / f".tmp-old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
    return dest


def write_checkpoint(dest: Path, files: dict[str, Any], meta: dict, replace: bool = False) -> Path:
    """Write `files` (name → tensor dict for .safetensors, str for text; names may hold a folder) to `dest`,
    with meta.json and the manifest, atomically (`replace`: see `publish`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    for name, obj in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            _save_tensors(obj, path)
        else:
            path.write_text(obj)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    write_manifest(tmp)
    out = publish(tmp, dest, replace) if replace else publish(tmp, dest)
    for stale in dest.parent.glob(f".tmp-{dest.name}-*"):  # the leftovers of killed writes of `dest`
        shutil.rmtree(stale, ignore_errors=True)
    return out


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = []
    for p in ckdir.iterdir():
        m = STEP_RE.match(p.name)  # published, so complete when written; `verify` says whether still whole
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


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
    """A checkpoint directory that verifies against its manifest."""
    p = Path(ckpt)
    if is_run_dir(p):  # a run directory stands for its final checkpoint
        if not (p / "final" / "config.yaml").is_file():
            steps = list_checkpoints(p)
            newest = f"its newest step checkpoint is {steps[-1][1]}" if steps else "nor any step checkpoint"
            raise UserError(f"'{ckpt}' is a run directory with no final/ checkpoint yet (the run has not "
                            f"finished); {newest}")
        p = p / "final"
    if not p.is_dir() or not (p / "config.yaml").is_file():
        raise UserError(f"checkpoint '{ckpt}' not found (expected a directory with config.yaml, e.g. runs/NAME/final)")
    return verify(p)


def is_run_dir(path: Path) -> bool:
    """A run directory (config.yaml beside checkpoints/ or final/), not a checkpoint (no meta.json)."""
    path = Path(path)
    return path.is_dir() and not (path / "meta.json").is_file() and (path / "config.yaml").is_file() and \
        ((path / "checkpoints").is_dir() or (path / "final").is_dir())


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


# ---------------------------------------------------------------------------------------------
# reading DCP without running code

# What a DCP `.metadata` pickle may name: PyTorch's checkpoint metadata classes and the torch values
# they hold (dtypes, sizes, layout), nothing that can run code; found by tracing the globals of this
# trainer's checkpoints. The same allow-list idea as torch.load(weights_only=True) (torch/_weights_only_unpickler.py).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _safe_reader(ckpt: Path):
    """A DCP FileSystemReader whose `.metadata` is unpickled through an allow-list (PyTorch's own reader
    calls pickle.load on it, torch/distributed/checkpoint/filesystem.py)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(ckpt))


def _safe_planner():
    """DCP's default load planner, except that non-tensor entries (optimizer hyper-parameters) are read
    with torch.load(weights_only=True), where PyTorch's planner unpickles them unrestricted (default_planner.py)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()


def _dcp_metadata(ckpt: Path):
    try:
        return _safe_reader(ckpt).read_metadata()
    except Exception as e:
        raise _load_error(e, ckpt, "checkpoint metadata") from None


# ---------------------------------------------------------------------------------------------
# the manifest: a checkpoint is trusted only when whole

MANIFEST = "manifest.json"


class UntrustedCheckpoint(UserError):
    """A checkpoint without a manifest: made elsewhere or by hand, so nothing says its files are whole."""


class DamagedCheckpoint(UserError):
    """A checkpoint whose files differ from its manifest (truncated, missing, changed or unlisted)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> Path:
    """Record the size and sha256 of every file under `root` in `root/manifest.json` (written last)."""
    root = Path(root)
    files = {name: {"size": (root / name).stat().st_size, "sha256": _sha256(root / name)} for name in _files(root)}
    (root / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))
    return root / MANIFEST


def verify(ckpt: str | Path, share: tuple[int, int] = (0, 1)) -> Path:
    """Check checkpoint `ckpt` against its manifest before any of its files is opened: every listed file
    present with its size, no unlisted file, and the sha256 of the files of this `share` (rank, world
    size: ranks split the hashing) equal to the recorded ones. Raises Untrusted/DamagedCheckpoint."""
    p = Path(ckpt)
    if not (p / MANIFEST).is_file():
        raise UntrustedCheckpoint(
            f"'{p}' has no {MANIFEST}: daybreak writes one into every checkpoint, so this one was made elsewhere "
            "or by hand and its files cannot be checked")
    try:
        listed = json.loads((p / MANIFEST).read_text())["files"]
        sizes = {str(name): int(entry["size"]) for name, entry in listed.items()}
        digests = {str(name): str(entry["sha256"]) for name, entry in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"checkpoint '{p}' is damaged: its {MANIFEST} is unreadable ({type(e).__name__})") from None
    present = _files(p)
    for name in sorted(sizes):
        if not (p / name).is_file():
            raise DamagedCheckpoint(f"checkpoint '{p}' is damaged: {name} is missing")
        if (p / name).stat().st_size != sizes[name]:
            raise DamagedCheckpoint(f"checkpoint '{p}' is damaged: {name} has {(p / name).stat().st_size} bytes, "
                                    f"the manifest says {sizes[name]} (truncated or changed)")
    extra = [name for name in present if name not in sizes]
    if extra:
        raise DamagedCheckpoint(f"checkpoint '{p}' is damaged: {extra[0]} is not in its {MANIFEST}")
    rank, world = share
    for name in sorted(sizes)[rank::world]:
        if _sha256(p / name) != digests[name]:
            raise DamagedCheckpoint(f"checkpoint '{p}' is damaged: {name} does not match its sha256 in {MANIFEST}")
    return p


def latest_complete(run_dir: Path, dist, log=print) -> Path | None:
    """The newest step checkpoint of `run_dir` that verifies (every rank hashes its share of the files and
    all agree); a damaged one is reported in one line, set aside as `step_N.damaged-T` (never deleted)
    and the previous one is tried."""
    found = list_checkpoints(run_dir)
    for i in range(len(found) - 1, -1, -1):
        path = found[i][1]
        try:
            verify(path, share=(dist.rank, dist.world_size))
            problem = ""
        except DamagedCheckpoint as e:
            problem = str(e)
        bad = torch.tensor([float(bool(problem))], device=dist.device)
        if not dist.all_reduce_sum(bad).item():
            return path
        dist.barrier()  # every rank is done reading it before it is moved
        older = f"resuming from the previous complete checkpoint {found[i - 1][1].name}" if i else \
            "no older complete checkpoint, starting from the beginning"
        log(f"warning: {problem or f'checkpoint {path} is damaged (found by another rank)'}; "
            f"set aside as {path.name}.damaged-*; {older}")
        if dist.is_main:
            os.replace(path, path.parent / f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        dist.barrier()
    return None


def dcp_load(state: dict, ckpt: Path, dist, what: str) -> None:
    """Load a sharded checkpoint into `state` in place (resharding to this world size), or a UserError."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    _dcp_metadata(ckpt)  # a refused .metadata is one line here; inside dcp.load it is logged with a traceback first
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=_safe_reader(ckpt), planner=_safe_planner(),
                     process_group=dist.checkpoint_group(), no_dist=not dist.enabled)
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error in a CheckpointException
        raise _load_error(e, ckpt, what) from None


def _load_error(e: BaseException, ckpt: Path, what: str) -> UserError:
    """One line with the real cause of a failed DCP read: a mismatch with this run, or the file's own error."""
    cause = _root_cause(e)
    text = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
    mismatch = isinstance(cause, (KeyError, ValueError, RuntimeError)) and any(
        word in str(cause).lower() for word in ("missing key", "unexpected key", "size mismatch", "shape"))
    why = "does not match this run's parameters" if mismatch else "could not be read"
    return UserError(f"{what}: '{ckpt}' {why} ({text})")


def _root_cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException, through any chained causes."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    return e


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / ".metadata").is_file()


def read_sharded(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` of a sharded checkpoint (prefix stripped), read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _dcp_metadata(ckpt).state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if state:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with _single_process_ok():
                dcp.load(state, storage_reader=_safe_reader(ckpt), planner=_safe_planner(), no_dist=True)
        except (Exception, CheckpointException) as e:
            raise _load_error(e, ckpt, f"reading {prefix}*") from None
    return {k[len(prefix):]: v for k, v in state.items()}


def has_tensors(ckpt: Path, name: str) -> bool:
    """Whether checkpoint `ckpt` holds the part `name` (e.g. "text_encoder.safetensors"), in either layout."""
    ckpt = Path(ckpt)
    if (ckpt / name).is_file():
        return True
    if name not in SHARDED_PREFIX or not is_sharded(ckpt):
        return False
    keys = _dcp_metadata(ckpt).state_dict_metadata
    return any(k.startswith(SHARDED_PREFIX[name]) for k in keys)


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    """One part of a checkpoint as full CPU tensors, from a consolidated file or a sharded checkpoint."""
    path = Path(ckpt) / name
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own error type: a damaged or foreign file
            raise UserError(f"'{path}' is not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    if name in SHARDED_PREFIX and is_sharded(Path(ckpt)):
        found = read_sharded(Path(ckpt), SHARDED_PREFIX[name])
        if found:
            return found
    raise UserError(f"checkpoint '{ckpt}' has no {name}")


def convert_checkpoint(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write a sharded checkpoint's weights (raw, EMA, text tower, recipe) in the consolidated layout.
    A non-empty `out` is refused (before any work) unless `force`, and then replaced."""
    from daybreak.io.store import check_output

    src = check_checkpoint(src)
    if not is_sharded(src):
        raise UserError(f"'{src}' is already a consolidated checkpoint (no DCP .metadata)")
    check_output(out, directory=True, force=force)
    if Path(out).resolve() == src.resolve() or src.resolve() in Path(out).resolve().parents:
        raise UserError(f"convert: '{out}' is inside the checkpoint '{src}'; write it elsewhere")
    files: dict[str, Any] = {"config.yaml": (src / "config.yaml").read_text()}
    for name, prefix in SHARDED_PREFIX.items():
        tensors = read_sharded(src, prefix)
        if tensors:
            files[name] = tensors
    if not any(name.startswith("transformer") for name in files):
        raise UserError(f"convert: '{src}' holds no transformer weights; nothing written")
    if (src / "tokenizer").is_dir():  # the demo text tower's vocabulary (JSON), which its weights need
        files.update({f"tokenizer/{f.name}": f.read_text() for f in sorted((src / "tokenizer").iterdir()) if f.is_file()})
    try:
        meta = json.loads((src / "meta.json").read_text()) if (src / "meta.json").is_file() else {}
    except ValueError:
        raise UserError(f"convert: '{src}/meta.json' is not valid JSON") from None
    return write_checkpoint(Path(out), files, {**meta, "layout": "consolidated", "converted_from": str(src)},
                            replace=force)


class ShardedSave:
    """One sharded checkpoint being written: every rank writes its shards (and RNG) under a shared
    temporary directory; rank 0 publishes it under its final name once all shards are on disk.

    Synchronous by default. With `async_save` the tensors are staged to CPU memory and written by
    a background thread while training goes on. `done()` is this rank's view; the caller agrees on
    it across ranks (the trainer folds it into its per-step all-reduce) and then every rank calls
    `finish()` at the same step: rank 0 publishes (only it touches directory names), the others
    take no collective, so the ranks stay in step. `wait()` (every rank) blocks until published.
    """

    def __init__(self, dest: Path, state: dict, files: dict[str, str], rng: bytes, meta: dict, dist,
                 async_save: bool = False, *, tag: str) -> None:
        import torch.distributed.checkpoint as dcp

        self.dest, self.meta, self.dist = Path(dest), meta, dist
        # `tag` (the same on every rank: rank 0's PID) keeps two processes from ever sharing a temporary
        self.tmp = self.dest.parent / f".tmp-{self.dest.name}-{tag}"
        if dist.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)  # a leftover of a killed save of this step
            (self.tmp / "rng").mkdir(parents=True)
            for name, text in files.items():
                (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (self.tmp / name).write_text(text)
        dist.barrier()
        (self.tmp / "rng" / f"rank_{dist.rank:05d}.safetensors").write_bytes(rng)
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
            write_manifest(self.tmp)  # every rank's shards and RNG file are on disk: DCP's save has returned
            publish(self.tmp, self.dest)
        self.published = True

    def done(self) -> bool:
        """Whether this rank's part of the write has finished (published or not)."""
        return self.published or self.future is None or self.future.done()

    def finish(self) -> None:
        """Publish a write that every rank reported done (called by every rank at the same step)."""
        if self.future is not None:
            self.future.result()
        self._publish()

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
        self._publish()
        self.dist.barrier()
