"""A run's state as named stateful parts, and everything that moves it to and from disk.

The parts (torchtitan's checkpoint idea): `model` (the transformer, a text tower trained with it,
the recipe's trainable pieces under `recipe.<name>`), `ema` (their shadow), `optim` (Muon/AdamW
moments), `schedulers`, `data` (the loader's position), `progress` (step and sample counters) and
`rng` (each rank's generators). Tensors go through torch.distributed.checkpoint, so a checkpoint
written by any world size loads onto any other; the small parts go in `trainer.json` and each rank's
generators in `rng/rank_RRRRR.safetensors` (formats that cannot carry code, unlike a pickle).

`TrainState` owns save (sharded, optionally in the background), load (resume), consolidate
(`final/`: full weights gathered on rank 0) and `init_from` (another run's or a diffusers model's
weights, the speedrun's 512 px → 1024 px hand-over).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from daybreak.errors import UserError
from daybreak.io import checkpoint as ck
from daybreak.model.diffusers_folder import is_diffusers_dir, load_diffusers_transformer
from daybreak.optim import Optimizers
from daybreak.recipe import INGREDIENTS
from daybreak.training.distributed import Dist, rng_state, set_rng_state
from daybreak.training.ema import EMA


@dataclass
class Progress:
    """Where a run is: optimizer steps taken, global samples consumed (skipped steps included: it
    keys the per-sample draws) and non-finite steps skipped."""

    step: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0


def _to_local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: sliced to this rank's shard when `like` is a DTensor (no communication)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


class TrainState:
    """The named stateful parts of one run (see the module docstring)."""

    def __init__(self, *, tracked: nn.ModuleDict, recipe: nn.ModuleDict, ema: EMA, optim: Optimizers, data,
                 progress: Progress, dist: Dist, log=print, extra_files: dict[str, str] | None = None) -> None:
        self.tracked, self.ema, self.optim, self.data = tracked, ema, optim, data
        self.extra_files = dict(extra_files or {})  # text files every checkpoint carries (the demo tokenizer)
        self.progress, self.dist, self.log = progress, dist, log
        # everything the optimizer trains, under the names sharded checkpoints use
        self.trainable = nn.ModuleDict({**tracked, "recipe": recipe})
        # step checkpoints are written under `.tmp-step_N-<rank 0's PID>`: no two processes share one
        pid = torch.tensor([float(os.getpid() if dist.is_main else 0)], device=dist.device)
        self.tmp_tag = f"{int(dist.all_reduce_sum(pid).item())}"

    # ------------------------------------------------------------------ the parts
    def _optimizers(self) -> list:
        return list(self.optim.optimizers.values())

    def tensors(self) -> dict:
        """The DCP parts: model, ema and optim, as (possibly sharded) tensors."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.trainable), "ema": dict(self.ema.shadow),
                "optim": get_optimizer_state_dict(self.trainable, self._optimizers())}

    def small(self) -> dict:
        """The parts that are not tensors (trainer.json): numbers, strings, lists and dicts only. A LambdaLR's
        state holds its counters and learning rates; its lambdas are code, rebuilt from the config."""
        p = self.progress
        return {"step": p.step, "samples_seen": p.samples_seen, "nonfinite_total": p.nonfinite_total,
                "schedulers": {n: {k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}
                               for n, s in self.optim.schedulers.items()},
                "ema": self.ema.settings(), "data": self.data.state_dict(), "world_size": self.dist.world_size}

    # ------------------------------------------------------------------ step checkpoints
    def save(self, dest: Path, config_yaml: str, run_name: str, async_save: bool = False) -> ck.ShardedSave:
        """Start writing a sharded step checkpoint of the whole state (every rank takes part)."""
        meta = {"step": self.progress.step, "run": run_name, "layout": "sharded", "world_size": self.dist.world_size}
        files = {"config.yaml": config_yaml, "trainer.json": json.dumps(self.small(), indent=1), **self.extra_files}
        return ck.ShardedSave(dest, self.tensors(), files, rng_state(), meta, self.dist, async_save, tag=self.tmp_tag)

    def load(self, ckpt: Path) -> None:
        """Restore a sharded step checkpoint, written by any world size, onto this one."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not ck.is_sharded(ckpt):
            raise UserError(f"'{ckpt}' is not a resumable step checkpoint (no DCP .metadata)")
        state = self.tensors()
        ck.dcp_load(state, ckpt, self.dist, "cannot resume")
        set_model_state_dict(self.trainable, state["model"])
        set_optimizer_state_dict(self.trainable, self._optimizers(), state["optim"])
        try:
            small = json.loads((ckpt / "trainer.json").read_text())
            for name, sched in self.optim.schedulers.items():
                sched.load_state_dict({**small["schedulers"][name], "lr_lambdas": [None] * len(sched.lr_lambdas)})
            self.ema.load_settings(small["ema"])
            self.data.load_state_dict(small["data"])
            step, seen, nonfinite = small["step"], small["samples_seen"], small["nonfinite_total"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot resume: '{ckpt / 'trainer.json'}' is not a daybreak trainer state "
                            f"({type(e).__name__}: {str(e)[:120]})") from None
        rng = ckpt / "rng" / f"rank_{self.dist.rank:05d}.safetensors"
        if rng.is_file():  # a rank beyond the saving run's world size keeps its fresh generators
            try:
                set_rng_state(rng.read_bytes())
            except Exception as e:  # safetensors' own error type, or a file of other tensors
                raise UserError(f"cannot resume: '{rng}' is not a generator state ({str(e)[:120]})") from None
        self.progress.step, self.progress.samples_seen, self.progress.nonfinite_total = step, seen, nonfinite

    # ------------------------------------------------------------------ final/
    def consolidate(self, dest: Path, config_yaml: str, run_name: str) -> Path:
        """Full weights (raw, EMA, recipe) gathered on rank 0 in the single-file layout (`final/`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.trainable, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in self.ema.shadow.items()}
        if self.dist.is_main:
            files = {"config.yaml": config_yaml, **self.extra_files}
            for name, prefix in ck.SHARDED_PREFIX.items():
                source, prefix = (ema, prefix[len("ema."):]) if prefix.startswith("ema.") else (full, prefix[len("model."):])
                part = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
                if part:
                    files[name] = part
            ck.write_checkpoint(dest, files, {"step": self.progress.step, "run": run_name, "layout": "consolidated"})
        self.dist.barrier()
        return Path(dest)

    # ------------------------------------------------------------------ init_from
    def init_from(self, source: str, optimizer: bool = False) -> None:
        """Load the transformer (and its EMA, a trained text tower, SPRINT's fusion) of `source`: a checkpoint, a
        run directory (its `final/`) or a diffusers PRX folder. The optimizer starts fresh unless
        `optimizer`, and then `source` must be a sharded step checkpoint with the same parameters."""
        if is_diffusers_dir(source):  # a released PRX model: its weights are the start and the EMA's start
            kwargs, sd = load_diffusers_transformer(source)
            config = self.tracked["transformer"].config
            own = self.tracked.state_dict()
            recipe = {}  # diffusers' parts that are daybreak ingredients (resolution_embeds)
            for name, cls in INGREDIENTS.items():
                section, part = cls.from_diffusers(kwargs, sd)
                if section is not None and not all(f"recipe.{name}.{k}" in own for k in part):
                    keys = " ".join(f"{name}.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in section.items())
                    raise UserError(f"init_from={source}: its transformer has {cls.diffusers_part}; set {keys}")
                recipe |= {f"recipe.{name}.{k}": v for k, v in part.items()}
            bad = {k: v for k, v in kwargs.items() if config.get(k) != v}
            if bad:
                raise UserError(f"init_from={source}: model.* differs from the diffusers config: {bad}")
            if optimizer:
                raise UserError(f"init_from={source}: a diffusers folder has no optimizer state (init_optimizer=false)")
            own = {k: v for k, v in own.items() if not k.startswith("transformer.")}
            # a trained text tower keeps its init
            weights = {**own, **recipe, **{f"transformer.{k}": v for k, v in sd.items()}}
            self._apply(source, weights, weights)
            self.log(f"initialised the transformer and its EMA from the diffusers model in {source}")
            return
        src = ck.resolve_source(source)
        own = self.tracked.state_dict()
        weights, ema = {}, {}
        for part in self.tracked:
            if part != "transformer" and not ck.has_tensors(src, f"{part}.safetensors"):
                # e.g. a SPRINT run started from a dense one: its fusion keeps its neutral init
                weights.update({k: v for k, v in own.items() if k.startswith(f"{part}.")})
                continue
            raw = ck.load_tensors(src, f"{part}.safetensors")
            # a source without EMA (ema.enabled=false) starts the EMA from its weights
            avg = ck.load_tensors(src, f"{part}_ema.safetensors") if ck.has_tensors(src, f"{part}_ema.safetensors") else raw
            weights.update({f"{part}.{k}": v for k, v in raw.items()})
            ema.update({f"{part}.{k}": v for k, v in avg.items()})
        weights = {k: v for k, v in weights.items() if k in own}  # recipe.safetensors also holds training-only parts
        ema = {**{k: v for k, v in weights.items() if k not in ema}, **ema}
        self._apply(source, weights, ema)
        if optimizer:
            self._load_optimizer(src)
        self.log(f"initialised weights and EMA{' and optimizer' if optimizer else ''} from {src}")

    def _apply(self, source: str, weights: dict, ema: dict) -> None:
        """Load full (unsharded) weights into the possibly sharded model, and `ema` into its EMA."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        try:
            set_model_state_dict(self.tracked, weights, options=StateDictOptions(full_state_dict=True))
        except RuntimeError as e:
            raise UserError(f"init_from={source}: its weights do not fit this model ({str(e).splitlines()[0][:200]})") from None
        missing = sorted(set(self.ema.shadow) - set(ema))
        if missing:
            raise UserError(f"init_from={source}: no EMA weights for {missing[0]} ...")
        self.ema.load_shadow({k: _to_local_like(ema[k], v) for k, v in self.ema.shadow.items()})

    def _load_optimizer(self, src: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not ck.is_sharded(src):
            raise UserError(f"init_from={src}: optimizer state lives only in step checkpoints (checkpoints/step_*)")
        state = {"optim": get_optimizer_state_dict(self.trainable, self._optimizers())}
        ck.dcp_load(state, src, self.dist, f"init_from={src} (optimizer)")
        set_optimizer_state_dict(self.trainable, self._optimizers(), state["optim"])
