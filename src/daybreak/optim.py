"""Optimizers of the recipe: Muon on the transformer blocks' matrices, AdamW on the rest.

Muon is implemented here rather than taken from `torch.optim.Muon` (torch >= 2.9), for three
reasons:
- `torch.optim.Muon` always orthogonalises in bf16. daybreak trains in fp32 on CPUs, where bf16
  matmuls run 50-130x slower on machines without bf16 matrix units; here Newton-Schulz runs in bf16
  on CUDA (as the reference implementation does) and in fp32 elsewhere.
- Under FSDP2 the spec wants each update orthogonalised on the full matrix. torch's version feeds
  the sharded DTensor to every Newton-Schulz matmul (correct, but one redistribution per matmul);
  here the update is gathered once, orthogonalised, and each rank keeps its own shard.
- Its Newton-Schulz function is private (`torch.optim._muon`), so it could not be tested directly.

The arithmetic follows the spec: buf <- mu*buf + g; update = g + mu*buf (nesterov) or buf; five
quintic Newton-Schulz steps on X / (||X||_F + 1e-7); p <- p - lr * 0.2*sqrt(max(m, n)) * update.
torch's version keeps buf as an EMA (mu*buf + (1-mu)*g) and blends g.lerp(buf, mu): the same
direction scaled by (1 - mu), which the Frobenius normalisation removes, so the two agree up to eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from daybreak.errors import UserError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

Named = list[tuple[str, nn.Parameter]]


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Orthogonalise a matrix: G = U S V^T -> about U S' V^T with S' in roughly [0.7, 1.2].

    The quintic's coefficients maximise the slope at zero, so few steps suffice but singular
    values oscillate around 1 instead of converging to it. bf16 on CUDA, fp32 elsewhere.
    """
    a, b, c = NS_COEFFICIENTS
    x = (g.float() / (g.norm() + eps)).to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _orthogonalise(update: Tensor, steps: int, eps: float) -> Tensor:
    """Newton-Schulz on the full matrix; a DTensor (FSDP2 shard) is gathered once, then re-sliced."""
    if not hasattr(update, "full_tensor"):
        return newton_schulz(update, steps, eps)
    from torch.distributed.tensor import DTensor, Replicate

    full = newton_schulz(update.full_tensor(), steps, eps)
    mesh = update.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, update.placements)  # Replicate -> Shard: local slicing


class Muon(Optimizer):
    """Momentum, orthogonalised by Newton-Schulz, scaled to AdamW's update RMS (0.2*sqrt(max(m, n)))."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            mu = group["momentum"]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
            lr = group["lr"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for p, u in zip(params, updates):
                scale = 0.2 * math.sqrt(max(p.shape))
                p.add_(_orthogonalise(u, group["ns_steps"], group["eps"]), alpha=-lr * scale)
        return loss


def split_params(model: nn.Module, extra: Sequence[nn.Module] = (), muon_scope: str = "blocks.") -> tuple[Named, Named]:
    """(Muon, AdamW) lists of (name, param): 2-D params under `muon_scope` vs everything else.

    Params of `extra` modules (REPA projector, SPRINT fusion, a trainable text encoder) always go
    to AdamW, named `extra{i}.<name>`. Frozen params and params seen twice are skipped.
    """
    muon: Named = []
    adam: Named = []
    seen: set[int] = set()
    named = [(n, p, True) for n, p in model.named_parameters()]
    named += [(f"extra{i}.{n}", p, False) for i, m in enumerate(extra) for n, p in m.named_parameters()]
    for name, p, in_model in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        to_muon = in_model and p.ndim == 2 and name.startswith(muon_scope)
        (muon if to_muon else adam).append((name, p))
    return muon, adam


OPTIMIZERS = ("muon", "adamw")


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


class Optimizers:
    """The optimizers of one run and their warm-up schedules, stepped and checkpointed together."""

    def __init__(self, optimizers: dict[str, Optimizer], warmup_steps: int) -> None:
        self.optimizers = optimizers
        self.schedulers = {name: LambdaLR(opt, _warmup(warmup_steps)) for name, opt in optimizers.items()}
        self.params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
        for sched in self.schedulers.values():
            sched.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def lrs(self) -> dict[str, float]:
        return {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}


def _adamw(params: list[nn.Parameter], **kwargs) -> AdamW:
    fast = {"fused": True} if all(p.is_cuda for p in params) else {"foreach": True}
    return AdamW(params, **kwargs, **fast)


def build_optimizer(
    model: nn.Module,
    extra: Sequence[nn.Module] = (),
    *,
    name: str = "muon",
    lr: float = 1e-4,
    warmup_steps: int = 1000,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    muon_momentum: float = 0.95,
    muon_nesterov: bool = True,
    muon_ns_steps: int = 5,
    muon_lr: float | None = None,
    log: Callable[[str], None] = print,
) -> Optimizers:
    """Muon + AdamW ("muon") or AdamW alone ("adamw"); logs a table of what each one trains."""
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer must be 'muon' or 'adamw', got {name!r}")
    muon_named, adam_named = split_params(model, extra)
    if name == "adamw":
        muon_named, adam_named = [], muon_named + adam_named
    elif not muon_named:
        raise UserError("optimizer 'muon' found no 2-D parameters under 'blocks.'; use 'adamw'")
    adam_kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    groups: dict[str, Named] = {}
    optimizers: dict[str, Optimizer] = {}
    if muon_named:
        groups["muon"] = muon_named
        optimizers["muon"] = Muon(
            [p for _, p in muon_named],
            lr=lr if muon_lr is None else muon_lr,
            momentum=muon_momentum,
            nesterov=muon_nesterov,
            ns_steps=muon_ns_steps,
            weight_decay=weight_decay,
        )
    if adam_named:
        groups["adamw"] = adam_named
        optimizers["adamw"] = _adamw([p for _, p in adam_named], **adam_kwargs)
    log(f"{'optimizer':<10}{'tensors':>8}{'parameters':>14}")
    for group, named in groups.items():
        log(f"{group:<10}{len(named):>8}{sum(p.numel() for _, p in named):>14,}")
    return Optimizers(optimizers, warmup_steps)


def optimizers_from_config(model: nn.Module, extra: Sequence[nn.Module], o, log: Callable[[str], None] = print
                           ) -> Optimizers:
    """`build_optimizer` with the `optim` config section's values."""
    return build_optimizer(model, extra, name=o.name, lr=o.lr, warmup_steps=o.warmup_steps, betas=tuple(o.betas),
                           eps=o.eps, weight_decay=o.weight_decay, muon_momentum=o.muon_momentum,
                           muon_nesterov=o.muon_nesterov, muon_ns_steps=o.muon_ns_steps, muon_lr=o.muon_lr, log=log)
