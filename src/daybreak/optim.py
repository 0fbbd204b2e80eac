"""Optimizers of the recipe: Muon on the transformer blocks' matrices, AdamW on the rest.

Muon is implemented here rather than taken from `torch.optim.Muon` (torch >= 2.9), for three
reasons:
- `torch.optim.Muon` always orthogonalises in bf16. daybreak trains in fp32 on CPUs, where bf16
  matmuls run 50-130x slower on machines without bf16 matrix units; here Newton-Schulz runs in bf16
  on CUDA (as the reference implementation does) and in fp32 elsewhere.
- Under FSDP2 each update must be orthogonalised on the full matrix. torch's version feeds the
  sharded DTensor to every Newton-Schulz matmul (one redistribution per matmul). Here
  (`distributed=True`, the default) each matrix has one owner rank, balanced by Newton-Schulz FLOPs:
  one all-to-all brings the owner every rank's row shard of its matrices, the owner orthogonalises
  them, and one more all-to-all sends each rank its rows of the result (the owner-per-matrix split
  of PRX's `muon_fsdp2`); so each rank does about 1/world of the FLOPs and no rank gathers every
  matrix.
  `distributed=False` is the replicated path, kept for comparison: every rank gathers every
  matrix once and orthogonalises all of them.
- Its Newton-Schulz function is private (`torch.optim._muon`), so it could not be tested directly.

The arithmetic follows the spec: buf <- mu*buf + g; update = g + mu*buf (nesterov) or buf; five
quintic Newton-Schulz steps on X / (||X||_F + 1e-7); p <- p - lr * 0.2*sqrt(max(m, n)) * update.
torch's version keeps buf as an EMA (mu*buf + (1-mu)*g) and blends g.lerp(buf, mu): the same
direction scaled by (1 - mu), which the Frobenius normalisation removes, so the two agree up to eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from daybreak.errors import UserError
from daybreak.schema import Registry, ranged

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

Named = list[tuple[str, nn.Parameter]]


def ns_dtype(device: torch.device) -> torch.dtype:
    """The precision Newton-Schulz runs in: bf16 on CUDA (as PRX does), fp32 elsewhere, where bf16
    matmuls are slow. The Gram form (`_gram_newton_schulz`) is used only in fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def gram_form(device: torch.device) -> bool:
    """Whether `newton_schulz` on `device` takes the Gram form where it is cheaper (`ns_flops(gram=)`)."""
    return ns_dtype(device) == torch.float32


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Orthogonalise a matrix, or a stack of same-shaped matrices (..., m, n): G = U S V^T -> about
    U S' V^T with S' in roughly [0.7, 1.2].

    The quintic's coefficients maximise the slope at zero, so few steps suffice but singular
    values oscillate around 1 instead of converging to it. bf16 on CUDA (as PRX does); fp32
    elsewhere, in the Gram form (`_gram_newton_schulz`) for matrices where that costs fewer FLOPs.
    """
    a, b, c = NS_COEFFICIENTS
    shape = g.shape
    g = g.reshape(-1, *shape[-2:]).float()
    x = (g / (torch.linalg.matrix_norm(g, keepdim=True) + eps)).to(ns_dtype(g.device))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    if gram_form(g.device) and uses_gram(*x.shape[-2:], steps):
        x = _gram_newton_schulz(x, steps)
    else:
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(shape)


def _gram_newton_schulz(x: Tensor, steps: int) -> Tensor:
    """The same quintic iterated on the s×s Gram matrices instead of the (k, s, l) stack (s < l).

    Each step is X <- M X with M = aI + bA + cA², A = X Xᵀ; M is a polynomial in A, so it commutes
    with A, the next Gram matrix is M A M and the result is (M_k ... M_0) X_0: two s×s×l products in
    all instead of two per step (Amsel, Chen, Dao et al. 2026, "Gram Newton-Schulz",
    tridao.me/blog/2026/gram-newton-schulz). In half precision the Gram form drifts and needs
    restarts; it is only used here in fp32, where it agrees with the direct form to fp32 rounding.
    """
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.mT
    eye = torch.eye(gram.size(-1), dtype=x.dtype, device=x.device)
    q = None
    for k in range(steps):
        m = torch.baddbmm(gram, gram, gram, beta=b, alpha=c).add_(eye, alpha=a)
        q = m if q is None else m @ q
        if k < steps - 1:
            gram = m @ gram @ m
    return q @ x


def orthogonalised(updates: Sequence[Tensor], steps: int = 5, eps: float = 1e-7) -> list[Tensor]:
    """`newton_schulz` of each matrix, same-shaped ones (up to a transpose) as one batched stack: a
    transformer's blocks repeat the same shapes, and batched matmuls keep small ones efficient."""
    flipped = [u.size(-2) > u.size(-1) for u in updates]
    wide = [u.mT if f else u for u, f in zip(updates, flipped)]  # NS(Gᵀ) = NS(G)ᵀ
    out: list[Tensor | None] = [None] * len(updates)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(wide):
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
    for idx in groups.values():
        done = newton_schulz(torch.stack([wide[i] for i in idx]), steps, eps)
        for i, d in zip(idx, done.to(updates[idx[0]].dtype).unbind()):
            out[i] = d.mT if flipped[i] else d
    return out


def ns_flops(m: int, n: int, steps: int = 5, gram: bool = False) -> float:
    """FLOPs of `newton_schulz` on an m×n matrix, with s = min(m, n) and l = max(m, n).

    Direct form, per step: the Gram matrix X·Xᵀ 2·s²·l, its square 2·s³, (b·A + c·A²)·X 2·s²·l.
    `gram` (fp32, off CUDA): the cheaper of that and the Gram form's 2·s²·l twice plus, per step,
    A² 2·s³, the product of the Ms 2·s³ (not on the first) and M·A·M 4·s³ (not on the last).
    """
    s, l = min(m, n), max(m, n)
    direct = steps * (4.0 * s * s * l + 2.0 * s**3)
    if not gram:
        return direct
    return min(direct, 4.0 * s * s * l + (8.0 * steps - 6.0) * s**3)


def uses_gram(m: int, n: int, steps: int = 5) -> bool:
    """Whether the Gram form costs fewer FLOPs than the direct one (for 5 steps: l > 1.5·s)."""
    return ns_flops(m, n, steps, gram=True) < ns_flops(m, n, steps)


def assign_owners(shapes: Sequence[tuple[int, int]], world: int, steps: int = 5, gram: bool = False) -> list[int]:
    """The rank that orthogonalises each matrix: largest Newton-Schulz cost first, onto the least
    loaded rank (ties to the lowest rank), so every rank computes the same assignment."""
    load, owners = [0.0] * world, [0] * len(shapes)
    cost = [ns_flops(m, n, steps, gram) for m, n in shapes]
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost[i]
    return owners


def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a matrix that `rank` holds under FSDP2's dim-0 sharding (`torch.chunk` sizes)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))


def muon_cost(shapes: Sequence[tuple[int, int]], world: int, distributed: bool = True, steps: int = 5,
              element_bytes: int = 4, gram: bool = False, replicas: int = 1) -> dict[str, float]:
    """Newton-Schulz FLOPs and bytes received per optimizer step on the busiest rank (`gram`: as
    computed off CUDA, see `ns_flops`); `replicas`: HSDP's, each sharding the rows over world/replicas ranks.

    Replicated: every rank orthogonalises every matrix and gathers the rows it lacks. Distributed:
    a rank orthogonalises the matrices it owns (`assign_owners` over all `world` ranks), receives its
    replica's other rows of them, and receives its own rows of every matrix it does not own: `bytes`
    from its own replica (NVLink within a node), `remote_bytes` from owners in other replicas.
    """
    shard = world // replicas
    if not distributed or world == 1:
        flops = sum(ns_flops(m, n, steps, gram) for m, n in shapes)
        received = [sum((m - shard_rows(m, shard, r)) * n for m, n in shapes) for r in range(shard)]
        return {"flops": flops, "bytes": element_bytes * max(received), "remote_bytes": 0.0}
    owners = assign_owners(shapes, world, steps, gram)
    flops = [sum(ns_flops(m, n, steps, gram) for (m, n), o in zip(shapes, owners) if o == r) for r in range(world)]
    near = [sum((m - shard_rows(m, shard, r % shard)) * n if o == r else
                shard_rows(m, shard, r % shard) * n * (o // shard == r // shard)
                for (m, n), o in zip(shapes, owners)) for r in range(world)]
    far = [sum(shard_rows(m, shard, r % shard) * n for (m, n), o in zip(shapes, owners) if o // shard != r // shard)
           for r in range(world)]
    return {"flops": max(flops), "bytes": element_bytes * max(near), "remote_bytes": element_bytes * max(far)}


def _mesh_group(mesh):
    """The process group over every rank of `mesh`, ranked in the mesh's row-major order (owner numbering)."""
    return mesh.get_group(0) if mesh.ndim == 1 else mesh._flatten().get_group(0)


def _orthogonalise_owned(updates: list[Tensor], steps: int, eps: float) -> list[Tensor]:
    """Newton-Schulz of FSDP2-sharded updates (DTensors, rows sharded over the mesh's last dimension,
    replicated over HSDP's replica dimension), each on one owner among all the mesh's ranks; returns this
    rank's rows of every result (plain tensors). Two all-to-alls, no full gather: an owner receives its
    matrices' rows from the ranks of its own replica (which hold the same update as every replica), and
    sends every rank of every replica its rows of the result. On CUDA the rows travel in bf16, the
    precision Newton-Schulz runs in there (half the traffic).

    Owners over all ranks rather than within each replica's shard group (every replica orthogonalising
    its own copy): for PRX small on 4 × 8 H200 (112 matrices, 1.16 G elements, 47.9 TFLOP of bf16
    Newton-Schulz a step) the busiest rank's Newton-Schulz drops from 1/8 to 1/32 of the FLOPs, 15.1 to
    3.8 ms at 40 % of the bf16 peak, for 3/32 of the elements (217 MB in bf16, 4.3 ms at 50 GB/s) that
    now cross InfiniBand: 8.1 ms a step less. Per element it pays whenever Newton-Schulz's FLOPs per
    element over the compute rate (41 k / 396 TFLOP/s ≈ 105 ps here, growing with the width) exceed the
    bf16 bytes over the InfiniBand rate (2 / 50 GB/s = 40 ps), for any replica count.
    """
    import torch.distributed as dist

    mesh = updates[0].device_mesh
    shard = mesh.size(mesh.ndim - 1)
    world, group = mesh.size(), _mesh_group(mesh)
    coord = mesh.get_coordinate()
    me = coord[0] * shard + coord[-1] if mesh.ndim > 1 else coord[0]
    shapes = [tuple(u.shape) for u in updates]
    dtype, device = updates[0].dtype, updates[0].device
    owners = assign_owners(shapes, world, steps, gram=gram_form(device))
    mine = [i for i, o in enumerate(owners) if o == me]
    wire = torch.bfloat16 if device.type == "cuda" else dtype
    local = [u.to_local().to(wire) for u in updates]

    def numel(i: int, r: int) -> int:  # elements of matrix i that rank r holds
        return shard_rows(shapes[i][0], shard, r % shard) * shapes[i][1]

    def flat(parts: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in parts]) if parts else torch.empty(0, dtype=wire, device=device)

    def peers(r: int, q: int) -> bool:  # same replica
        return r // shard == q // shard

    # to owner r in my replica: my rows of each matrix r owns, in matrix order
    sent = [[i for i, o in enumerate(owners) if o == r] if peers(r, me) else [] for r in range(world)]
    send_sizes = [sum(numel(i, me) for i in sent[r]) for r in range(world)]
    recv_sizes = [sum(numel(i, r) for i in mine) if peers(r, me) else 0 for r in range(world)]
    recv = torch.empty(sum(recv_sizes), dtype=wire, device=device)
    dist.all_to_all_single(recv, flat([local[i] for r in range(world) for i in sent[r]]), recv_sizes, send_sizes,
                           group=group)
    rows: dict[int, list[Tensor]] = {i: [] for i in mine}
    for r, chunk in enumerate(recv.split(recv_sizes)):
        if peers(r, me):
            for i, piece in zip(mine, chunk.split([numel(i, r) for i in mine])):
                rows[i].append(piece.view(-1, shapes[i][1]))
    done = {i: o.to(wire) for i, o in zip(mine, orthogonalised([torch.cat(rows[i]) for i in mine], steps, eps))}
    # back to every rank r of every replica: its rows of each result I own
    back = []
    for r in range(world):
        start = [sum(shard_rows(shapes[i][0], shard, q) for q in range(r % shard)) for i in mine]
        back += [done[i][s: s + shard_rows(shapes[i][0], shard, r % shard)] for i, s in zip(mine, start)]
    theirs = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    back_sizes = [sum(numel(i, r) for i in mine) for r in range(world)]
    in_sizes = [sum(numel(i, me) for i in theirs[r]) for r in range(world)]
    out = torch.empty(sum(in_sizes), dtype=wire, device=device)
    dist.all_to_all_single(out, flat(back), in_sizes, back_sizes, group=group)
    result: list[Tensor] = [torch.empty(0)] * len(updates)
    for r, chunk in enumerate(out.split(in_sizes)):
        for i, piece in zip(theirs[r], chunk.split([numel(i, me) for i in theirs[r]])):
            result[i] = piece.view_as(local[i]).to(dtype)
    return result


def _row_sharded(u: Tensor) -> bool:
    """FSDP2's layout: rows sharded over the last mesh dimension, replicated over any other (HSDP)."""
    if not hasattr(u, "device_mesh"):
        return False
    *rest, last = u.placements
    return last.is_shard(0) and all(p.is_replicate() for p in rest)


def _orthogonalise(updates: list[Tensor], steps: int, eps: float) -> list[Tensor]:
    """Newton-Schulz on full matrices; a DTensor (FSDP2 shard) is gathered once, then re-sliced."""
    done = orthogonalised([u.full_tensor() if hasattr(u, "full_tensor") else u for u in updates], steps, eps)
    return [_reshard(full, u) if hasattr(u, "full_tensor") else full for u, full in zip(updates, done)]


def _reshard(full: Tensor, like: Tensor) -> Tensor:
    """A full result laid out as the DTensor `like` (Replicate -> Shard: local slicing, no traffic)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, like.placements)


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
        distributed: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.distributed = distributed
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
            for p, o in zip(params, self._orthogonalised(updates, group["ns_steps"], group["eps"])):
                p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss

    def _orthogonalised(self, updates: list[Tensor], steps: int, eps: float) -> list[Tensor]:
        """Every update orthogonalised: sharded ones on their owner ranks when `distributed`, the
        rest (plain tensors, or the replicated path) here."""
        owned = [i for i, u in enumerate(updates) if _row_sharded(u)]
        if not (self.distributed and owned):
            return _orthogonalise(updates, steps, eps)
        from torch.distributed.tensor import DTensor

        rest = [i for i in range(len(updates)) if i not in owned]
        out: list[Tensor | None] = [None] * len(updates)
        for i, o in zip(rest, _orthogonalise([updates[i] for i in rest], steps, eps)):
            out[i] = o
        for i, shard in zip(owned, _orthogonalise_owned([updates[i] for i in owned], steps, eps)):
            u = updates[i]
            out[i] = DTensor.from_local(shard, u.device_mesh, u.placements, run_check=False, shape=u.shape,
                                        stride=u.stride())
        return out


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


@dataclass(frozen=True)
class Decay:
    """A schedule's shape after warm-up: the factor at progress p in [0, 1] of the decay, given the end
    ratio; `stable`: the decay is only the last `decay_fraction` of the run (wsd)."""

    factor: Callable[[float, float], float]
    text: str  # `Schedule.describe`'s phrase; {start} and {end} filled in
    stable: bool = False


SCHEDULES = Registry("optim.schedule", {
    "constant": Decay(lambda p, end: 1.0, "constant"),
    "cosine": Decay(lambda p, end: end + (1 - end) * (0.5 * (1 + math.cos(math.pi * p))), "cosine decay to {end}"),
    "linear": Decay(lambda p, end: end + (1 - end) * (1 - p), "linear decay to {end}"),
    "wsd": Decay(lambda p, end: end + (1 - end) * (1 - p), "constant until step {start}, then linear decay to {end}",
                 stable=True),
})


@dataclass(frozen=True)
class Schedule:
    """The learning rate as a multiple of `optim.lr` (and `optim.muon_lr`) at each step.

    A linear warm-up from 0 over `warmup` steps (PRX's), then `constant` (PRX's: 1 for ever), `cosine`
    or `linear` decay from 1 at the end of warm-up to `min_ratio` at step `total`, or `wsd`
    (warm-up, stable, decay): 1 until the last `decay_fraction` of the `total` steps, then linear to
    `min_ratio` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations"; a run can be extended from a checkpoint of its stable phase). Step k (0-based) trains
    with lr × factor(k); past `total` the factor stays at its end value.
    """

    kind: str = "constant"
    warmup: int = 0
    total: int = 1
    decay_fraction: float = 0.2
    min_ratio: float = 0.0
    decay: Decay = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", SCHEDULES[self.kind])

    def decay_start(self) -> int:
        """The step where the decay begins (the end of warm-up; for wsd, the last decay_fraction)."""
        if self.decay.stable:
            return max(self.warmup, self.total - round(self.decay_fraction * self.total))
        return self.warmup

    def __call__(self, step: int) -> float:
        warm = min(1.0, step / self.warmup) if self.warmup > 0 else 1.0
        start = self.decay_start()
        span = self.total - start
        p = min(1.0, max(0.0, (step - start) / span)) if span > 0 else float(step >= start)
        return warm * self.decay.factor(p, self.min_ratio)

    def describe(self) -> str:
        """One line for the planner and the run's log."""
        warm = f"linear warm-up over {self.warmup} steps, then " if self.warmup else ""
        end = f"{self.min_ratio:g}× at step {self.total}"
        body = self.decay.text.format(start=self.decay_start(), end=end)
        return f"{self.kind}: {warm}{body}"


def schedule_from_config(o, steps: int) -> Schedule:
    """The `optim` section's schedule for a run of `steps` steps."""
    return Schedule(kind=o.schedule, warmup=o.warmup_steps, total=steps, decay_fraction=o.decay_fraction,
                    min_ratio=o.min_lr_ratio)


class Optimizers:
    """The optimizers of one run and their learning-rate schedule (the same factor for every group:
    Muon's and AdamW's), stepped and checkpointed together."""

    def __init__(self, optimizers: dict[str, Optimizer], schedule: Schedule | int) -> None:
        self.optimizers = optimizers
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(warmup=schedule)
        self.schedulers = {name: LambdaLR(opt, self.schedule) for name, opt in optimizers.items()}
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


class MixedAdamW(AdamW):
    """AdamW whose fused/foreach kernels also run on groups mixing FSDP-sharded (DTensor) and plain
    (replicated) parameters, such as the transformer's vectors with the REPA projector.

    Multi-tensor kernels refuse a list mixing DTensors and plain tensors, so each step runs every
    group as two sub-groups, one per kind, with the group's hyperparameters (the scheduler's current
    lr included). The optimizer's groups, state and checkpoints are those of a plain AdamW.
    """

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        split = []
        for g in groups:
            kinds: dict[bool, list] = {}
            for p in g["params"]:
                kinds.setdefault(hasattr(p, "device_mesh"), []).append(p)
            split += [dict(g, params=ps) for ps in kinds.values()] if len(kinds) > 1 else [g]
        self.param_groups = split
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def _adamw(params: list[nn.Parameter], **kwargs) -> AdamW:
    fast = {"fused": True} if all(p.is_cuda for p in params) else {"foreach": True}
    return MixedAdamW(params, **kwargs, **fast)


def _muon_split(muon_named: Named, adam_named: Named) -> tuple[Named, Named]:
    if not muon_named:
        raise UserError("optimizer 'muon' found no 2-D parameters under 'blocks.'; use 'adamw'")
    return muon_named, adam_named


# how each `optim.name` splits (Muon's candidates, the rest) between Muon and AdamW
OPTIMIZERS = Registry("optim.name", {
    "muon": _muon_split,
    "adamw": lambda muon_named, adam_named: ([], muon_named + adam_named),
})


@dataclass
class OptimConfig:
    """Config section `optim`: the optimizers, their hyperparameters and the learning-rate schedule."""

    name: OPTIMIZERS.choices = "muon"
    lr: float = ranged(1e-4, gt=0)
    warmup_steps: int = ranged(1000, ge=0)
    betas: list[float] = ranged(default_factory=lambda: [0.9, 0.95], ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0)
    weight_decay: float = ranged(0.0, ge=0)
    grad_clip: float = ranged(0.2, gt=0)
    muon_lr: float | None = ranged(None, gt=0)
    muon_momentum: float = ranged(0.95, ge=0, lt=1)
    muon_nesterov: bool = True
    muon_ns_steps: int = ranged(5, ge=1)
    muon_distributed: bool = True  # under FSDP2 each matrix's Newton-Schulz runs on one owner rank
    schedule: SCHEDULES.choices = "constant"  # after warm-up (PRX: constant); wsd decays over the last decay_fraction
    decay_fraction: float = ranged(0.2, gt=0, le=1)  # wsd: the share of train.steps spent decaying
    min_lr_ratio: float = ranged(0.0, ge=0, le=1)  # cosine, linear, wsd: the lr at the last step, as a multiple of optim.lr


def build_optimizer(model: nn.Module, extra: Sequence[nn.Module] = (), o: OptimConfig | None = None, *,
                    schedule: Schedule | None = None, log: Callable[[str], None] = print) -> Optimizers:
    """Muon + AdamW ("muon") or AdamW alone ("adamw") from the `optim` section `o` (default: its defaults);
    `schedule` defaults to `o.warmup_steps` of warm-up, then constant. Logs a table of what each one trains."""
    o = o if o is not None else OptimConfig()
    muon_named, adam_named = OPTIMIZERS[o.name](*split_params(model, extra))
    groups: dict[str, Named] = {}
    optimizers: dict[str, Optimizer] = {}
    if muon_named:
        groups["muon"] = muon_named
        optimizers["muon"] = Muon(
            [p for _, p in muon_named],
            lr=o.lr if o.muon_lr is None else o.muon_lr,
            momentum=o.muon_momentum,
            nesterov=o.muon_nesterov,
            ns_steps=o.muon_ns_steps,
            weight_decay=o.weight_decay,
            distributed=o.muon_distributed,
        )
    if adam_named:
        groups["adamw"] = adam_named
        optimizers["adamw"] = _adamw([p for _, p in adam_named], lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)
    log(f"{'optimizer':<10}{'tensors':>8}{'parameters':>14}")
    for group, named in groups.items():
        log(f"{group:<10}{len(named):>8}{sum(p.numel() for _, p in named):>14,}")
    return Optimizers(optimizers, schedule if schedule is not None else Schedule(warmup=o.warmup_steps))


def optimizers_from_config(model: nn.Module, extra: Sequence[nn.Module], o: OptimConfig,
                           log: Callable[[str], None] = print, steps: int | None = None) -> Optimizers:
    """`build_optimizer` with the `optim` section's schedule; `steps`: the run's length (`train.steps`),
    which a decaying schedule needs."""
    schedule = schedule_from_config(o, steps if steps is not None else 1)
    if o.schedule != "constant" and steps is None:
        raise UserError(f"optim.schedule={o.schedule} needs the run's length (train.steps)")
    log(f"learning rate: {schedule.describe()}")
    return build_optimizer(model, extra, o, schedule=schedule, log=log)
