"""Distributed Muon (each matrix orthogonalised on one owner rank) against single-process Muon.

2 and 3 gloo ranks (3 splits every matrix unevenly, and one matrix has fewer rows than ranks, so a
rank holds none of it), and HSDP's 2 replicas × 2 shards on 4, where the owners are spread over all
4 ranks: each matrix is orthogonalised once in all, not once per replica. The matrices are DTensors sharded by rows as FSDP2 shards them, and every
rank is given the same gradients (the full ones, sharded), so Muon itself is what is compared.
`DTensor.full_tensor` is made to raise during the distributed steps: no rank gathers a whole matrix.
The replicated path (`distributed=False`) runs alongside as the reference the option keeps.
"""

import pytest
import torch
from helpers import gloo_job

from daybreak.optim import Muon, assign_owners, muon_cost, ns_flops, shard_rows

SHAPES = [(12, 12), (7, 12), (13, 7), (2, 13), (16, 2)]


def _run(distributed: bool | None, mesh=None) -> list[torch.Tensor]:
    """Three Muon steps; `None`: one process on full matrices, else DTensors row-sharded on `mesh`'s last
    dimension (replicated over the first of a 2-D mesh, as HSDP)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(*s, generator=g) for s in SHAPES]
    place = [Replicate()] * (mesh.ndim - 1) + [Shard(0)] if mesh is not None else None
    shard = (lambda t: distribute_tensor(t, mesh, place)) if mesh is not None else (lambda t: t.clone())
    params = [torch.nn.Parameter(shard(w)) for w in full]
    opt = Muon(params, lr=0.1, distributed=bool(distributed))
    gather = DTensor.full_tensor
    for _ in range(3):
        for p, s in zip(params, SHAPES):
            p.grad = shard(torch.randn(*s, generator=g))
        if distributed:
            DTensor.full_tensor = lambda self: (_ for _ in ()).throw(AssertionError("full gather"))
        try:
            opt.step()
        finally:
            DTensor.full_tensor = gather
    out = [p.full_tensor() if mesh is not None else p.detach() for p in params]
    return out + [max((a - b).abs().max() for a, b in zip(out, full)).reshape(1)]


@gloo_job(4)
def _worker(rank: int, root: str) -> dict:
    """4 ranks: a 3-rank mesh on ranks 0-2, a 2-rank mesh on ranks 0 and 1, then 2 × 2 on all (one session)."""
    import daybreak.optim as optim
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    full = _run(None)
    three, pair = torch.distributed.new_group([0, 1, 2]), torch.distributed.new_group([0, 1])
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for world, mesh in ((3, DeviceMesh.from_group(three, "cpu") if rank < 3 else None),
                        (2, DeviceMesh.from_group(pair, "cpu") if rank < 2 else None), ("2x2", hsdp)):
        if mesh is not None:
            out[str(world)] = {str(mode): max((a - b).abs().max().item() for a, b in zip(_run(mode, mesh)[:-1], full[:-1]))
                               for mode in (True, False)}
        torch.distributed.barrier()
    count, ortho = [0], optim.orthogonalised
    optim.orthogonalised = lambda us, *a: (count.__setitem__(0, count[0] + len(us)), ortho(us, *a))[1]
    _run(True, hsdp)
    optim.orthogonalised = ortho
    out["orthogonalised"] = count[0]
    out["moved"] = full[-1].item()
    return out


@pytest.fixture
def four_ranks(gloo_ranks):
    return gloo_ranks(_worker)[1]


def test_distributed_muon_equals_one_process(four_ranks):
    ranks = four_ranks
    keys = ["2", "2x2", "3", "moved", "orthogonalised"]
    assert [sorted(r) for r in ranks] == [keys] * 2 + [[k for k in keys if k != "2"], ["2x2", "moved", "orthogonalised"]]
    for res in ranks:
        for world in ("2", "3", "2x2"):
            if world in res:
                assert res[world]["True"] <= 1e-6 and res[world]["False"] <= 1e-6
        assert res["moved"] > 1e-2  # the tolerance is tight against what three steps change
    # 3 steps × 5 matrices, each orthogonalised by one of the 4 ranks (per replica it would be 2 × 15)
    assert sum(r["orthogonalised"] for r in ranks) == 3 * len(SHAPES)
    assert all(r["orthogonalised"] > 0 for r in ranks)


def test_owners_balance_newton_schulz_flops():
    # one 5-step quintic on 4×8: s=4, l=8 -> 5·(4·16·8 + 2·64) = 3200; on 2×2: 5·(32 + 16) = 240
    assert ns_flops(4, 8) == ns_flops(8, 4) == 3200 and ns_flops(2, 2) == 240
    shapes = [(4, 8), (4, 8), (8, 4), (2, 2)]
    assert assign_owners(shapes, 2) == [0, 1, 0, 1]  # largest first, each onto the least loaded rank
    assert assign_owners(shapes, 1) == [0] * 4
    assert [shard_rows(7, 3, r) for r in range(3)] == [3, 3, 1]
    assert [shard_rows(2, 3, r) for r in range(3)] == [1, 1, 0]


def test_muon_cost_divides_work_and_traffic():
    shapes = [(4, 8), (4, 8), (8, 4), (2, 2)]
    rep, dis = muon_cost(shapes, 2, distributed=False), muon_cost(shapes, 2, distributed=True)
    assert rep["flops"] == 3 * 3200 + 240
    assert dis["flops"] == 2 * 3200  # rank 0's share; rank 1: 3200 + 240
    # replicated: a rank receives the half of every matrix it lacks, 16 + 16 + 16 + 2 elements; distributed,
    # rank 0: the other halves of the two it owns (16 + 16) and its halves of the other two results (16 + 2)
    assert rep["bytes"] == dis["bytes"] == 4 * 50
    big = [(5376, 1792)] * 32  # at 32 ranks: 1/32 of the FLOPs, about 2/32 of the replicated traffic
    assert muon_cost(big, 32)["flops"] == muon_cost(big, 1)["flops"] / 32
    assert muon_cost(big, 32)["bytes"] == 4 * 1792 * (5376 - 168 + 31 * 168)
    assert muon_cost(big, 32, distributed=False)["bytes"] == 4 * 1792 * 32 * (5376 - 168)
    # HSDP 4 replicas × 8 shards, owners over all 32: a rank owns one matrix, receives its replica's other
    # 7/8 of it, its 1/8 rows of the 7 owned in its replica, and over the network of the 24 owned elsewhere
    hsdp = muon_cost(big, 32, replicas=4)
    assert hsdp["flops"] == muon_cost(big, 1)["flops"] / 32
    assert hsdp["bytes"] == 4 * 1792 * (7 * 672 + 7 * 672) and hsdp["remote_bytes"] == 4 * 1792 * 24 * 672
