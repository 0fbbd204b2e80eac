"""A training run from a config: build the parts, the recipe, the data and the watchers, then fit.

This is where the pieces meet (`daybreak train`, `daybreak demo`, ablation studies and the Python
API's `daybreak.train` all come through here); the `Trainer` itself takes them ready-made.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from daybreak.build import build_parts, build_recipe, demo_tokenizer
from daybreak.config import Config, changed_keys, load_config, yaml_load
from daybreak.data import build_data
from daybreak.errors import Stopped, UserError
from daybreak.evaluate.periodic import PeriodicEval, SampleGrids
from daybreak.io import lock
from daybreak.training.distributed import init_distributed, shutdown
from daybreak.training.trainer import Trainer
from daybreak.training.validation import ValLoss


def _allowed(key: str, allow: Sequence[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allow)


def check_run_dir(cfg: Config, allow_changed: Sequence[str] = ()) -> None:
    """The run directory may take this run: new, empty, or holding a run of the same resolved config
    (resume). A run of another config is refused with its differing keys, unless every one of them is
    in `allow_changed` (a key or a section); a file, or a folder of other things, is refused too.
    Every rank checks before any collective, so a refusal ends all ranks alike."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir '{run_dir}' is a file; give a directory for the run")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        started = any((run_dir / d).is_dir() for d in ("checkpoints", "tokenizer")) or \
            (run_dir / lock.LOCK_NAME).is_file()  # killed before config.yaml
        if run_dir.is_dir() and any(run_dir.iterdir()) and not started:
            raise UserError(f"run.dir '{run_dir}' is not empty and holds no daybreak run (no config.yaml); "
                            f"give a new or empty directory")
        return
    try:
        old = yaml_load(saved.read_text())
    except yaml.YAMLError:
        raise UserError(f"{saved} is not valid YAML; it no longer describes the run in '{run_dir}'") from None
    try:
        old = load_config(old).to_dict()  # the saved run resolved as this one is (defaults filled in)
    except UserError:  # a key or value this version does not accept: compared as written
        old = old if isinstance(old, dict) else {}
    # where the run lives and where it reports do not change what its weights are
    changed = {k: v for k, v in changed_keys(old, cfg.to_dict()).items() if k != "run.dir" and not k.startswith("log.")}
    refused = [k for k in changed if not _allowed(k, allow_changed)]
    if refused:
        shown = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise UserError(f"run.dir '{run_dir}' holds a run with a different config ({shown}{more}); start a new "
                        f"run with run.dir=NEW_DIR, or continue this one with --allow-changed {','.join(refused)}")


def run_tokenizer(cfg: Config, dist, log=print) -> Path | None:
    """The demo text tower's tokenizer folder for this run, `run.dir/tokenizer/` (None for other towers).

    It is made once, when the run first starts: copied from `init_from` when that checkpoint (or
    diffusers folder) has one (its text tower's weights only fit its own vocabulary), else trained
    on the run's captions. Every later start, a resume included, reads it, so a run never changes
    its vocabulary; every checkpoint also holds a copy. Rank 0 writes it (atomically), the others wait.
    """
    if cfg.text.kind != "demo":
        return None
    folder = Path(cfg.run.dir) / "tokenizer"
    if not (folder / "tokenizer.json").is_file() and dist.is_main:
        source = None
        if cfg.init_from:
            candidates = [Path(cfg.init_from) / "tokenizer", Path(cfg.init_from) / "final" / "tokenizer"]
            source = next((c for c in candidates if (c / "tokenizer.json").is_file()), None)
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(".tmp-tokenizer-*"):  # killed runs' (the run directory's lock is ours)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f".tmp-tokenizer-{socket.gethostname()}-{os.getpid()}"
        try:
            if source is not None:
                shutil.copytree(source, tmp)
                log(f"text tokenizer: {source}'s")
            else:
                tokenizer, items = demo_tokenizer(cfg)
                tokenizer.save_pretrained(str(tmp))
                log(f"text tokenizer: byte-level BPE of {len(tokenizer)} tokens, trained on the captions of {items} items")
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return folder


def lock_run_dir(cfg: Config, dist) -> None:
    """Rank 0 takes the run directory's lock (see `daybreak.io.lock`); every rank learns whether it did,
    so a refusal ends them all alike (rank 0 names the holder)."""
    refused = ""
    if dist.is_main:
        try:
            lock.acquire(cfg.run.dir)
        except UserError as e:
            refused = str(e)
    if dist.enabled:
        flag = torch.tensor([float(bool(refused))], device=dist.device)
        if dist.all_reduce_sum(flag).item() and not refused:
            refused = f"run.dir '{cfg.run.dir}' is in use by another process (rank 0 names it)"
    if refused:
        raise UserError(refused)


def remove_temps(run_dir: Path) -> None:
    """The temporary folders and files of this run's unfinished writes (the lock makes them all ours). A
    `.tmp-old-*` is kept: cut between publish's two renames, it is the only copy of the previous `final/`."""
    for tmp in [*run_dir.glob(".tmp-*"), *(run_dir / "checkpoints").glob(".tmp-*")]:
        if not tmp.name.startswith(".tmp-old-"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def build_trainer(cfg: Config, *, progress: bool = True, log=print, allow_changed: Sequence[str] = ()) -> Trainer:
    """A `Trainer` for `cfg` with everything the config asks for (its run directory checked first)."""
    check_run_dir(cfg, allow_changed)
    dist = init_distributed(cfg.train.device)
    lock_run_dir(cfg, dist)
    tokenizer = run_tokenizer(cfg, dist, log if dist.is_main else (lambda *_: None))
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg, tokenizer=tokenizer)
    ingredients = build_recipe(cfg, parts)
    say = log if dist.is_main else (lambda *_: None)
    # built now: a missing metric weight fails before step 1, not hours later
    watchers = [SampleGrids(cfg)] if cfg.sample.prompts else []
    if cfg.eval.every > 0:
        watchers.append(PeriodicEval(cfg, dist.device))
    if cfg.val.every > 0:
        watchers.append(ValLoss(cfg, parts.pixels_per_token, log=say))
    hook = getattr(parts.text_encoder, "loader_hook", None)  # a cached text tower is read in the loader's workers
    data = build_data(cfg, rank=dist.rank, world_size=dist.world_size,
                      batch_size=cfg.train.global_batch // dist.world_size, patch=parts.pixels_per_token, log=say,
                      batch_hook=hook() if hook is not None else None)
    return Trainer(cfg, parts, data, ingredients, watchers=watchers, progress=progress, log=log)


def train(cfg: Config, *, progress: bool = True, allow_changed: Sequence[str] = ()) -> Path:
    """Train `cfg` (resuming from its run directory's newest checkpoint, holding its lock); returns the final
    checkpoint. `allow_changed`: config keys that may differ from the run directory's earlier run (see
    `check_run_dir`). A run stopped by SIGTERM or SIGUSR1 raises `Stopped` (its `.checkpoint`: the step
    checkpoint it saved), so no caller goes on as if it had finished; Ctrl-C removes the unfinished writes'
    temporaries."""
    try:
        trainer = build_trainer(cfg, progress=progress, allow_changed=allow_changed)
        path = trainer.fit()
        if trainer.stopped_by:
            raise Stopped(trainer.stopped_by, path)
        return path
    except KeyboardInterrupt:
        if lock.held(cfg.run.dir):
            remove_temps(Path(cfg.run.dir))
        raise
    finally:
        lock.release(cfg.run.dir)
        shutdown()
