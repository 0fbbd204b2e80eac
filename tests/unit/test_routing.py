"""TREAD and SPRINT routing hooks, on a small stand-in block loop and on the real PRX transformer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from daybreak.errors import UserError
from daybreak.model.hooks import TokenState, gather_tokens, run_after, run_before
from daybreak.config import load_config
from daybreak.recipe.sprint import Sprint, SprintConfig
from daybreak.recipe.tread import Tread, TreadConfig, TreadRouter, routed_count
from daybreak.schema import check_fields

HIDDEN, DEPTH, START, END = 8, 6, 1, 3


class StandIn(nn.Module):
    """A block loop with token mixing and RoPE-dependent blocks, driven through the hook contract."""

    def __init__(self, depth: int = DEPTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))

    def forward(self, x: Tensor, rope: Tensor, hooks=()) -> Tensor:
        b, n = x.shape[:2]
        state = TokenState(x=x, rope=rope, index=torch.arange(n).expand(b, n))
        for i, block in enumerate(self.blocks):
            state = run_before(hooks, i, state)
            mixed = state.x + state.x.mean(dim=1, keepdim=True)
            state = state.with_x(state.x + torch.tanh(block(mixed)) * torch.cos(state.rope))
            state = run_after(hooks, i, state)
        return state.x


class Recorder:
    """Keeps the stream it sees before and after every block."""

    def __init__(self) -> None:
        self.before: dict[int, TokenState] = {}
        self.after: dict[int, TokenState] = {}

    def before_block(self, i: int, state: TokenState) -> TokenState:
        self.before[i] = state
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        self.after[i] = state
        return state


def inputs(b: int = 3, n: int = 10, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, HIDDEN, generator=g), torch.randn(b, n, 1, generator=g) * 3


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def routed_positions(kept: Tensor, n: int) -> list[list[int]]:
    return [sorted(set(range(n)) - set(row.tolist())) for row in kept]


def test_routed_tokens_skip_the_span_unchanged_and_kept_tokens_are_processed():
    model, (x, rope) = StandIn(), inputs()
    outer, inner = Recorder(), Recorder()
    router = TreadRouter(0.5, START, END, torch.Generator().manual_seed(0))
    model(x, rope, hooks=[outer, router, inner])
    entry, exit_ = outer.before[START].x, inner.after[END].x
    for b, routed in enumerate(routed_positions(router.kept_index, 10)):
        assert torch.equal(exit_[b, routed], entry[b, routed])
        assert not torch.allclose(exit_[b, router.kept_index[b]], entry[b, router.kept_index[b]])
    assert inner.after[END].rope.shape == rope.shape and torch.equal(inner.after[END].index, outer.before[START].index)


def test_span_blocks_see_kept_tokens_with_their_own_rope_and_index():
    model, (x, rope) = StandIn(), inputs()
    inner = Recorder()
    router = TreadRouter(0.5, START, END, torch.Generator().manual_seed(0))
    model(x, rope, hooks=[router, inner])
    for i in range(START, END + 1):
        assert torch.equal(inner.before[i].index, router.kept_index)
        assert torch.equal(inner.before[i].rope, gather_tokens(rope, router.kept_index))
    for i in (0, END + 1):
        assert inner.before[i].x.shape[1] == 10


@pytest.mark.parametrize("n", [1, 2, 7, 10, 256])
def test_exact_routed_count_and_sorted_unique_kept_indices(n: int):
    model, (x, rope) = StandIn(), inputs(n=n)
    router = TreadRouter(0.5, START, END, torch.Generator().manual_seed(3))
    out = model(x, rope, hooks=[router])
    expected = {1: 0, 2: 1, 7: 4, 10: 5, 256: 128}[n]  # round(3.5) = 4; N = 1 routes nothing
    assert routed_count(0.5, n) == expected and out.shape == x.shape
    kept = router.kept_index
    assert kept.shape == (3, n - expected)
    assert torch.equal(kept, kept.sort(dim=1).values) and all(len(set(r.tolist())) == r.numel() for r in kept)
    if n == 1:
        assert torch.equal(out, model(x, rope))


def test_samples_draw_different_subsets_and_seeded_generators_are_deterministic():
    model, (x, rope) = StandIn(), inputs(b=4, n=64)

    def kept(seed: int) -> Tensor:
        router = TreadRouter(0.5, START, END, torch.Generator().manual_seed(seed))
        model(x, rope, hooks=[router])
        return router.kept_index

    assert torch.equal(kept(5), kept(5))
    assert not torch.equal(kept(5), kept(6))
    assert len({tuple(r.tolist()) for r in kept(5)}) == 4


def test_fraction_zero_is_exactly_the_dense_model():
    model, (x, rope) = StandIn(), inputs()
    router = TreadRouter(0.0, START, END)
    assert torch.equal(model(x, rope, hooks=[router]), model(x, rope))
    assert router.kept_index.shape == (3, 10)


def test_routed_tokens_get_no_gradient_from_the_span_but_reach_earlier_blocks():
    model, (x, rope) = StandIn(), inputs(b=1)
    inner = Recorder()
    router = TreadRouter(0.5, START, END, torch.Generator().manual_seed(0))
    model(x, rope, hooks=[router, inner])
    exit_ = inner.after[END].x[0]
    routed = routed_positions(router.kept_index, 10)[0][0]
    kept = router.kept_index[0, 0].item()
    span = [p for i in range(START, END + 1) for p in model.blocks[i].parameters()]
    early = list(model.blocks[0].parameters())

    def grads(token: int, params: list[nn.Parameter]) -> list[Tensor]:
        return torch.autograd.grad(exit_[token].sum(), params, retain_graph=True, allow_unused=True)

    assert all(g is None or not g.any() for g in grads(routed, span))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(routed, early))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(kept, span))


def test_a_router_redraws_on_every_forward():
    model, (x, rope) = StandIn(), inputs(n=64)
    router = TreadRouter(0.5, START, END, torch.Generator().manual_seed(0))
    model(x, rope, hooks=[router])
    first = router.kept_index
    model(x, rope, hooks=[router])
    assert not torch.equal(first, router.kept_index)


def checked(c, section: str) -> None:
    """A section's checks as a config with it enabled runs them: its fields' ranges at load, then its own
    checks against the model's depth when the ingredient is built."""
    check_fields(c, f"{section}.")
    c.check(DEPTH)


def test_tread_ingredient_hooks_validation_and_seeding():
    tread = Tread(TreadConfig(fraction=0.5, start=START, end=END), seed=7)
    assert list(tread.parameters()) == [] and tread.dense_hooks() == []
    model, (x, rope) = StandIn(), inputs(n=32)

    def kept(ingredient: Tread, step: int) -> Tensor:
        (router,) = ingredient.block_hooks(step)
        model(x, rope, hooks=[router])
        return router.kept_index

    again = Tread(TreadConfig(start=START, end=END), seed=7)
    first_micro = kept(tread, 10)
    assert torch.equal(first_micro, kept(again, 10))  # resumable: fixed by (seed, step)
    assert not torch.equal(first_micro, kept(tread, 10))  # the next micro-batch of step 10
    assert not torch.equal(first_micro, kept(Tread(TreadConfig(start=START, end=END), seed=7), 11))
    (router,) = tread.routed_hooks(torch.Generator().manual_seed(1))
    assert isinstance(router, TreadRouter) and (router.start, router.end, router.fraction) == (START, END, 0.5)
    for bad in (dict(start=2, end=DEPTH), dict(start=3, end=2), dict(fraction=1.5)):
        with pytest.raises(UserError):
            checked(TreadConfig(**bad), "tread")


def test_sprint_keeps_the_exact_count_and_restores_full_length():
    model, (x, rope) = StandIn(), inputs(n=10)
    sprint = Sprint(SprintConfig(drop_ratio=0.75, start=START, end=END), HIDDEN, seed=0)
    inner = Recorder()
    (router,) = sprint.block_hooks(0)
    out = model(x, rope, hooks=[router, inner])
    assert out.shape == x.shape
    assert all(inner.before[i].x.shape == (3, 10 - round(7.5), HIDDEN) for i in range(START, END + 1))
    assert inner.after[END].x.shape == x.shape and torch.equal(inner.after[END].index, torch.arange(10).expand(3, 10))


def test_sprint_at_init_is_dense_without_drop_and_tread_with_drop():
    model, (x, rope) = StandIn(), inputs(n=12)
    sprint = Sprint(SprintConfig(drop_ratio=0.75, start=START, end=END), HIDDEN)
    assert max_diff(model(x, rope, hooks=sprint.dense_hooks()), model(x, rope)) < 1e-6
    sparse = model(x, rope, hooks=sprint.routed_hooks(torch.Generator().manual_seed(2)))
    tread = model(x, rope, hooks=[TreadRouter(0.75, START, END, torch.Generator().manual_seed(2))])
    assert max_diff(sparse, tread) < 1e-6
    assert max_diff(sparse, model(x, rope)) > 1e-3


def test_sprint_trains_mask_token_and_fusion_which_inference_then_needs():
    model, (x, rope) = StandIn(), inputs(n=12)
    sprint = Sprint(SprintConfig(drop_ratio=0.75, start=START, end=END), HIDDEN, seed=0)
    assert {n for n, _ in sprint.named_parameters()} == {"mask_token", "fusion.weight", "fusion.bias"}
    model(x, rope, hooks=sprint.block_hooks(0)).square().mean().backward()
    assert sprint.mask_token.grad.abs().sum() > 0 and sprint.fusion.weight.grad.abs().sum() > 0
    assert model.blocks[START].weight.grad.abs().sum() > 0
    sprint.zero_grad(set_to_none=True)
    model(x, rope, hooks=sprint.dense_hooks()).square().mean().backward()
    assert sprint.mask_token.grad is None and sprint.fusion.weight.grad.abs().sum() > 0
    with torch.no_grad():
        sprint.fusion.weight.mul_(0.5)
    assert max_diff(model(x, rope, hooks=sprint.dense_hooks()), model(x, rope)) > 1e-3


def test_sprint_validation():
    for bad in (dict(end=DEPTH), dict(drop_ratio=-0.1)):
        with pytest.raises(UserError):
            checked(SprintConfig(**bad), "sprint")
    with pytest.raises(UserError, match="model.hidden_size"):  # the width the fusion layer takes
        load_config("tiny", ["sprint.enabled=true", "model.hidden_size=0"])


def tiny_prx() -> nn.Module:
    """The real transformer at `tiny` size, with its zero-initialised modulation made non-zero so blocks act."""
    from daybreak.model import build_transformer, preset

    torch.manual_seed(0)
    model = build_transformer(**preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model


def prx_inputs(b: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, 5, 32, generator=g)


def test_tread_on_the_prx_transformer():
    model, args = tiny_prx(), prx_inputs(2, 16, 20)  # 4 x 5 = 20 tokens, span 1..2 of 4 blocks
    dense = model(*args)
    assert torch.equal(model(*args, hooks=[TreadRouter(0.0, 1, 2)]), dense)
    outer, inner = Recorder(), Recorder()
    router = TreadRouter(0.5, 1, 2, torch.Generator().manual_seed(0))
    out = model(*args, hooks=[outer, router, inner])
    assert out.shape == dense.shape and (out - dense).abs().max() > 1e-4
    assert inner.before[1].x.shape == (2, 10, 64) and torch.equal(inner.before[2].index, router.kept_index)
    for b, routed in enumerate(routed_positions(router.kept_index, 20)):
        assert torch.equal(inner.after[2].x[b, routed], outer.before[1].x[b, routed])
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())


def test_sprint_on_the_prx_transformer():
    model, args = tiny_prx(), prx_inputs(2, 12, 20)  # 3 x 5 = 15 tokens: 15 - round(11.25) = 4 kept
    sprint = Sprint(SprintConfig(drop_ratio=0.75, start=1, end=2), 64, seed=0)
    assert max_diff(model(*args, hooks=sprint.dense_hooks()), model(*args)) < 1e-5
    inner = Recorder()
    out = model(*args, hooks=[*sprint.block_hooks(0), inner])
    assert inner.before[1].x.shape == (2, 4, 64) and out.shape == args[0].shape
    out.square().mean().backward()
    assert sprint.mask_token.grad.abs().sum() > 0 and sprint.fusion.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[1].parameters())
