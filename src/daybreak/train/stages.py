"""Stages: start a run from another run's weights (the speedrun's 512 px → 1024 px hand-over).

`init_from` names a checkpoint directory (consolidated or sharded) or a run directory, which
stands for its `final/`. The weights and their EMA are loaded, whatever world size wrote them or
trains now; the optimizer starts fresh unless asked for, and then the source must be a sharded
step checkpoint of a run with the same trainable parameters (`final/` holds no optimizer state).
"""

from __future__ import annotations

import torch

from daybreak.errors import UserError
from daybreak.train import checkpoint as ck


def _to_local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: sliced to this rank's shard when `like` is a DTensor (no communication)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def init_weights(trainer, source: str, optimizer: bool = False) -> None:
    """Load the transformer (and its EMA, and a trained text tower) of `source` into `trainer`.

    `source` is a checkpoint, a run directory (its `final/`) or a diffusers PRX folder."""
    from daybreak.export import is_diffusers_dir, load_diffusers_transformer

    if is_diffusers_dir(source):  # a released PRX model: its weights are the start and the EMA's start
        kwargs, sd = load_diffusers_transformer(source)
        bad = {k: v for k, v in kwargs.items() if trainer.transformer.config.get(k) != v}
        if bad:
            raise UserError(f"init_from={source}: model.* differs from the diffusers config: {bad}")
        if optimizer:
            raise UserError(f"init_from={source}: a diffusers folder has no optimizer state (init_optimizer=false)")
        own = {k: v for k, v in trainer.tracked.state_dict().items() if not k.startswith("transformer.")}
        weights = {**own, **{f"transformer.{k}": v for k, v in sd.items()}}  # a trained text tower keeps its init
        _apply(trainer, source, weights, weights)
        trainer._print(f"initialised the transformer and its EMA from the diffusers model in {source}")
        return
    src = ck.resolve_source(source)
    weights, ema = {}, {}
    for part in trainer.tracked:
        if part != "transformer" and not ck.has_tensors(src, f"{part}.safetensors"):
            continue
        weights.update({f"{part}.{k}": v for k, v in ck.load_tensors(src, f"{part}.safetensors").items()})
        ema.update({f"{part}.{k}": v for k, v in ck.load_tensors(src, f"{part}_ema.safetensors").items()})
    _apply(trainer, source, weights, ema)
    if optimizer:
        _load_optimizer(trainer, src)
    trainer._print(f"initialised weights and EMA{' and optimizer' if optimizer else ''} from {src}")


def _apply(trainer, source: str, weights: dict, ema: dict) -> None:
    """Load full (unsharded) weights into the possibly sharded model, and `ema` into its EMA."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    try:
        set_model_state_dict(trainer.tracked, weights, options=StateDictOptions(full_state_dict=True))
    except RuntimeError as e:
        raise UserError(f"init_from={source}: its weights do not fit this model ({str(e).splitlines()[0][:200]})") from None
    state = trainer.ema.state_dict()
    missing = sorted(set(state["shadow"]) - set(ema))
    if missing:
        raise UserError(f"init_from={source}: no EMA weights for {missing[0]} ...")
    state["shadow"] = {k: _to_local_like(ema[k], v) for k, v in state["shadow"].items()}
    trainer.ema.load_state_dict(state)


def _load_optimizer(trainer, src) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not ck.is_sharded(src):
        raise UserError(f"init_from={src}: optimizer state lives only in step checkpoints (checkpoints/step_*)")
    state = {"optim": get_optimizer_state_dict(trainer.trainable, trainer._optimizers())}
    ck.dcp_load(state, src, trainer.dist, f"init_from={src} (optimizer)")
    set_optimizer_state_dict(trainer.trainable, trainer._optimizers(), state["optim"])
