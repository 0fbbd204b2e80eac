
import pytest
import torch
from torch import nn

import daybreak  # noqa: F401  (makes diffusers importable on CPU-only torch)
from daybreak.errors import UserError
from daybreak.optim import (Muon, OptimConfig, Schedule, build_optimizer, newton_schulz, ns_flops, orthogonalised,
                            split_params, uses_gram)


class Tiny(nn.Module):
    """A 'blocks.' matrix with bias (Muon + AdamW) and a head outside the blocks (AdamW)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 6)])
        self.head = nn.Linear(6, 2, bias=False)


def quintic_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """X <- a X + (b A + c A^2) X with A = X X^T, on X = G/||G||_F, in float64 (G wide)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / g.double().norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def test_gram_form_costs_and_equals_the_direct_quintic():
    # hand-worked: s=4, l=8, 5 steps. Direct 5·(4·16·8 + 2·64) = 3200; Gram 4·16·8 + 34·64 = 2688
    assert ns_flops(4, 8) == 3200 and ns_flops(8, 4, gram=True) == 2688 and uses_gram(4, 8)
    # at l = 1.5·s the two cost the same (2560), so the direct form is kept; square never pays
    assert ns_flops(4, 6) == ns_flops(4, 6, gram=True) == 2560 and not uses_gram(4, 6) and not uses_gram(8, 8)
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(48, 256, generator=gen, dtype=torch.float64)
    low_rank = torch.randn(48, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 256, generator=gen,
                                                                                     dtype=torch.float64)
    for g in (full, low_rank + 1e-3 * full):
        ref = quintic_reference(g)
        out = newton_schulz(g.float())  # fp32 on CPU: the Gram form (256 > 1.5·48)
        assert (out.double() - ref).abs().max() < 3e-5  # fp32 rounding; entries are up to 0.22
        torch.testing.assert_close(newton_schulz(g.float().T), out.T)


def test_batched_orthogonalisation_equals_one_matrix_at_a_time():
    gen = torch.Generator().manual_seed(2)
    mats = [torch.randn(8, 24, generator=gen), torch.randn(24, 8, generator=gen), torch.randn(8, 24, generator=gen),
            torch.randn(6, 6, generator=gen), torch.randn(8, 10, generator=gen)]  # three share a shape up to a transpose
    for got, m in zip(orthogonalised(mats), mats):
        assert got.shape == m.shape
        torch.testing.assert_close(got, newton_schulz(m), atol=1e-6, rtol=0)


def test_newton_schulz_singular_values_in_quintic_band():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    s_in = torch.linalg.svdvals(g / g.norm())
    assert s_in.min() < 0.1  # the input is far from orthogonal
    out = newton_schulz(g)
    s = torch.linalg.svdvals(out)
    assert out.shape == (64, 32)
    assert 0.68 < s.min() and s.max() < 1.2
    # tall inputs are orthogonalised through their transpose
    torch.testing.assert_close(newton_schulz(g.T), out.T)
    # same singular vectors as G: U^T O V is diagonal (O = U S' V^T)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.T @ out @ vh.T
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-4


def test_split_on_prx_transformer(capsys):
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(
        depth=2, hidden_size=32, num_heads=2, axes_dim=[8, 8], context_in_dim=16, in_channels=3, patch_size=4, bottleneck_size=8
    )
    projector = nn.Sequential(nn.Linear(32, 8), nn.SiLU(), nn.Linear(8, 8))
    frozen = nn.Linear(3, 3)
    frozen.requires_grad_(False)
    muon, adam = split_params(model, [projector, frozen])
    per_block_muon = ["attention.img_qkv_proj.weight", "attention.txt_kv_proj.weight", "attention.to_out.0.weight",
                      "gate_proj.weight", "up_proj.weight", "down_proj.weight", "modulation.lin.weight"]
    assert [n for n, _ in muon] == [f"blocks.{i}.{s}" for i in range(2) for s in per_block_muon]
    per_block_adam = ["attention.norm_q.weight", "attention.norm_k.weight", "attention.norm_added_k.weight", "modulation.lin.bias"]
    assert [n for n, _ in adam] == (
        ["img_in.0.weight", "img_in.0.bias", "img_in.1.weight", "img_in.1.bias", "time_in.in_layer.weight",
         "time_in.in_layer.bias", "time_in.out_layer.weight", "time_in.out_layer.bias", "txt_in.weight", "txt_in.bias"]
        + [f"blocks.{i}.{s}" for i in range(2) for s in per_block_adam]
        + ["final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
           "final_layer.adaLN_modulation.1.bias", "extra0.0.weight", "extra0.0.bias", "extra0.2.weight", "extra0.2.bias"]
    )
    lines: list[str] = []
    opts = build_optimizer(model, [projector, frozen], log=lines.append)
    assert isinstance(opts.optimizers["muon"], Muon)
    n_muon = sum(p.numel() for _, p in muon)
    n_adam = sum(p.numel() for _, p in adam)
    assert lines[1].split() == ["muon", "14", f"{n_muon:,}"]
    assert lines[2].split() == ["adamw", str(len(adam)), f"{n_adam:,}"]
    only_adam = build_optimizer(model, [projector], OptimConfig(name="adamw"), log=lines.append)
    assert list(only_adam.optimizers) == ["adamw"] and len(only_adam.params) == 14 + len(adam)


def test_user_errors():
    with pytest.raises(UserError):
        build_optimizer(Tiny(), o=OptimConfig(name="sgd"), log=lambda s: None)
    with pytest.raises(UserError):
        build_optimizer(nn.Linear(3, 3), o=OptimConfig(name="muon"), log=lambda s: None)


def test_muon_two_steps_match_hand_computation():
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(6, 4, generator=gen)
    g1, g2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    p = nn.Parameter(p0.clone())
    opt = Muon([p], lr=0.01, momentum=0.9, nesterov=True)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    scale = 0.01 * 0.2 * 6**0.5
    # step 1: buf = g1, update = g1 + 0.9 g1; step 2: buf = 0.9 g1 + g2, update = g2 + 0.9 buf
    u1 = 1.9 * g1
    u2 = g2 + 0.9 * (0.9 * g1 + g2)
    expected = p0.double() - scale * quintic_reference(u1.T).T - scale * quintic_reference(u2.T).T
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)
    # without the nesterov blend the second update would be the buffer alone: measurably different
    plain = p0.double() - scale * quintic_reference(u1.T).T - scale * quintic_reference((0.9 * g1 + g2).T).T
    assert (plain - expected).abs().max() > 1e-3
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.9 * g1 + g2)


def test_adamw_first_step_closed_form():
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = build_optimizer(model, o=OptimConfig(lr=1e-2, warmup_steps=0), log=lambda s: None)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    grads["head.weight"][0, 0] = 0.0
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opts.step()
    for n in ("blocks.0.bias", "head.weight"):  # AdamW: m_hat = g, v_hat = g^2 after bias correction
        expected = before[n] - 1e-2 * grads[n] / (grads[n].abs() + 1e-8)
        torch.testing.assert_close(model.get_parameter(n).detach(), expected)
    assert model.head.weight[0, 0] == before["head.weight"][0, 0]


def test_linear_warmup_then_constant():
    opts = build_optimizer(Tiny(), o=OptimConfig(lr=1e-3, muon_lr=2e-2, warmup_steps=4), log=lambda s: None)
    seen = [opts.lrs()]
    for _ in range(9):
        opts.step()
        seen.append(opts.lrs())
    assert seen[0] == {"muon": 0.0, "adamw": 0.0}
    assert seen[1] == pytest.approx({"muon": 5e-3, "adamw": 2.5e-4})
    assert seen[4] == pytest.approx({"muon": 2e-2, "adamw": 1e-3})
    assert seen[9] == pytest.approx({"muon": 2e-2, "adamw": 1e-3})
    constant = build_optimizer(Tiny(), o=OptimConfig(lr=1e-3, warmup_steps=0), log=lambda s: None)
    assert constant.lrs() == {"muon": 1e-3, "adamw": 1e-3}


def test_schedules_hand_worked():
    cosine = Schedule("cosine", warmup=2, total=10, min_ratio=0.1)
    # warm-up 0, 1/2; then 0.1 + 0.9 · (1 + cos(π · (k − 2)/8))/2; held at 0.1 past the end
    assert [cosine(k) for k in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])
    assert cosine(4) == pytest.approx(0.1 + 0.9 * (1 + 2**-0.5) / 2)
    linear = Schedule("linear", warmup=0, total=4)
    assert [linear(k) for k in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    wsd = Schedule("wsd", warmup=1, total=10, decay_fraction=0.3)  # stable to step 7, then 3 decay steps
    assert [wsd(k) for k in range(11)] == pytest.approx([0, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0])
    assert [Schedule(warmup=4)(k) for k in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]  # constant: PRX's
    with pytest.raises(UserError, match="optim.schedule"):
        Schedule("step")


def test_muon_and_adamw_follow_the_schedule():
    opts = build_optimizer(Tiny(), o=OptimConfig(lr=1e-3, muon_lr=2e-2), schedule=Schedule("linear", total=4, min_ratio=0.5),
                           log=lambda s: None)
    seen = [opts.lrs()]
    for _ in range(4):
        opts.step()
        seen.append(opts.lrs())
    assert [s["muon"] / 2e-2 for s in seen] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert [s["adamw"] / 1e-3 for s in seen] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])


def _train(model: nn.Module, opts, seeds: range) -> None:
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        opts.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opts.step()


def test_adamw_keeps_foreach_on_a_group_mixing_dtensors_and_plain_tensors():
    """FSDP2's sharded vectors and a replicated recipe part in one AdamW group: the foreach kernel
    (which refuses mixed lists) still runs, and the update is the per-tensor loop's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from daybreak.optim import MixedAdamW

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        values = [torch.randn(6), torch.randn(3, 2)]
        grads = [torch.randn(6), torch.randn(3, 2)]
        sharded = nn.Parameter(distribute_tensor(values[0].clone(), mesh, [Shard(0)]))
        plain = nn.Parameter(values[1].clone())
        reference = [nn.Parameter(v.clone()) for v in values]
        mixed = MixedAdamW([sharded, plain], lr=0.1, weight_decay=0.01, foreach=True)
        loop = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01, foreach=False)
        with pytest.raises(Exception):  # what plain AdamW's foreach path does with such a list
            bad = [nn.Parameter(distribute_tensor(values[0].clone(), mesh, [Shard(0)])), nn.Parameter(values[1].clone())]
            for p, g in zip(bad, grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)]) if hasattr(p, "device_mesh") else g.clone()
            torch.optim.AdamW(bad, lr=0.1, foreach=True).step()
        for _ in range(3):
            sharded.grad = distribute_tensor(grads[0].clone(), mesh, [Shard(0)])
            plain.grad, reference[0].grad, reference[1].grad = grads[1].clone(), grads[0].clone(), grads[1].clone()
            mixed.step()
            loop.step()
        assert mixed.param_groups[0]["foreach"] and len(mixed.param_groups) == 1
        assert torch.allclose(sharded.full_tensor(), reference[0], atol=1e-6)
        assert torch.allclose(plain, reference[1], atol=1e-6)
        assert not torch.equal(plain, values[1])  # it moved
    finally:
        dist.destroy_process_group()
