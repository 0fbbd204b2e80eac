"""Scale-out applied from outside the model: FSDP2 sharding, activation checkpointing, regional compile.

All three work per transformer block through `model.blocks` and leave parameter names unchanged
(no wrapper modules), so state dicts, EMA, export and the optimizer split see the same names
whether or not they are on. Order matters and follows torchtitan: checkpoint and compile first
(they replace a block's `forward`), then `fully_shard`, whose all-gather/reshard hooks run around
`__call__`, outside the compiled and checkpointed region.

The transformer is sharded, and so is a text tower trained with it (the demo's), so that EMA sees
sharded tensors only. The recipe's small trainable parts (REPA projector, SPRINT fusion) are used
outside any `forward` FSDP could hook, so they stay replicated; `sync_replicated_grads` averages
their gradients.
Frozen networks (REPA teacher, LPIPS, DINO) are replicated and never touch the optimizer.

Past one node, `train.replicate` turns FSDP into HSDP (`hsdp_mesh`): the same per-block units on a
(replicate, shard) mesh, so each replica shards the state over its own ranks and only gradient
shards cross between replicas. FP8 matmuls (`training/fp8.py`) swap the blocks' linear layers
before any of the three above.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from daybreak.errors import UserError
from daybreak.devices import to_device
from daybreak.training.distributed import Dist


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """`torch.compile` per block (regional): the blocks share one small graph per input shape.

    Shapes are static (`dynamic=False`): one compile per bucket and per token count a block sees
    (with TREAD or SPRINT, the routed span's and the dense one), then none across steps; static
    graphs fuse better than dynamic-shape ones, and a run has few shapes. The recompile limit (8
    graphs per code object by default, past which torch silently runs eager) is raised to cover
    aspect buckets × routing.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.blocks:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process: one per new input shape, or per recompile."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def shard_model(model: nn.Module, whole: tuple[nn.Module, ...] = (), param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, mesh=None, keep_gathered: int = 1) -> nn.Module:
    """FSDP2: one unit per block, the root unit holds the embeddings and final layer; each module of
    `whole` (a text tower trained with the model, used through its `__call__`) is one more unit.

    Master weights stay fp32 (sharded); `param_dtype` is what the all-gathered weights are cast to
    for compute (bf16 on GPU), `reduce_dtype` what gradients are reduce-scattered in. Forward
    inputs keep their dtype (`cast_forward_inputs=False`): autocast casts what the matmuls read,
    while the timestep and the RoPE table stay fp32, as they are in one process. The last
    `keep_gathered` blocks keep their weights gathered after forward, since backward needs them
    first (not re-gathering them saves their all-gather, at the cost of their bf16 weights held
    through the step). `mesh`: `hsdp_mesh`'s 2-D mesh for hybrid sharding, None for all ranks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    first_kept = len(model.blocks) - keep_gathered
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < first_kept)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in whole:
        fully_shard(m, mesh=mesh, mp_policy=policy)
    return model


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def replicas(replicate: int | str, world: int, local_world: int | None = None) -> int:
    """How many HSDP replicas `train.replicate` means on `world` ranks: an int as given, `node` one per
    node (world / the launcher's LOCAL_WORLD_SIZE). A count that does not divide the world is a
    UserError."""
    import os

    if replicate == "node":
        local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        replicate = max(1, world // local_world)
    if world % replicate:
        raise UserError(f"train.replicate={replicate} does not divide the {world} ranks into equal replicas")
    return replicate


def hsdp_mesh(replicate: int, dist: Dist):
    """The (replicate, shard) device mesh of hybrid sharding, or None for one replica (FSDP over every rank).

    Ranks are laid out row-major, so a replica is `world / replicate` consecutive ranks: with
    torchrun's numbering, one node when `replicate` is the node count. FSDP2 then all-gathers and
    reduce-scatters inside a replica (NVLink) and all-reduces each gradient shard across replicas
    (the only traffic over the network: 1/shard of the gradients instead of 3 passes over all weights).
    """
    if replicate == 1 or not dist.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (replicate, dist.world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


@torch.no_grad()
def sync_replicated_grads(params: list[nn.Parameter], dist: Dist) -> None:
    """Average replicated parameters' gradients over ranks, in one all-reduce.

    A parameter that got no gradient on any rank keeps `grad=None` (so AdamW skips it exactly as
    in a single process); one that got a gradient on some ranks only gets their sum / world size.
    """
    if not dist.enabled or not params:
        return
    flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
    has = to_device(torch.tensor([p.grad is not None for p in params], dtype=torch.float32), dist.device)
    buf = torch.cat([*[f.float() for f in flat], has])
    dist.all_reduce_sum(buf)
    buf /= dist.world_size
    has = buf[-len(params):] > 0
    for p, g, h in zip(params, buf[: -len(params)].split([p.numel() for p in params]), has.tolist()):
        p.grad = g.view_as(p).to(p.dtype) if h else None


def reshard(module: nn.Module) -> None:
    """Free the gathered weights FSDP keeps after a forward without backward (sampling, evaluation)."""
    for m in module.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
