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
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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
                reduce_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """FSDP2: one unit per block, the root unit holds the embeddings and final layer; each module of
    `whole` (a text tower trained with the model, used through its `__call__`) is one more unit.

    Master weights stay fp32 (sharded); `param_dtype` is what the all-gathered weights are cast to
    for compute (bf16 on GPU), `reduce_dtype` what gradients are reduce-scattered in. Forward
    inputs keep their dtype (`cast_forward_inputs=False`): autocast casts what the matmuls read,
    while the timestep and the RoPE table stay fp32, as they are in one process. The last block
    keeps its weights gathered after forward, since backward needs them first.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < last)
    fully_shard(model, mp_policy=policy)
    for m in whole:
        fully_shard(m, mp_policy=policy)
    return model


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
