"""PRXTransformer against diffusers' PRXTransformer2DModel: same weights, same outputs, plus the hook seam."""

import math

import daybreak  # noqa: F401  (makes torchvision importable before diffusers)
import pytest
import torch
from diffusers import PRXTransformer2DModel

from daybreak.errors import UserError
from daybreak.model import PRESETS, PRXTransformer, build_transformer, preset
from daybreak.model.hooks import TokenState, gather_tokens

PIXEL = dict(in_channels=3, patch_size=4, context_in_dim=24, hidden_size=32, mlp_ratio=3.5, num_heads=2, depth=2,
             axes_dim=[8, 8], bottleneck_size=16)  # fmt: skip
LATENT = dict(PIXEL, in_channels=4, patch_size=2, bottleneck_size=None)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere, including the zero-initialised modulation and final layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def inputs(cfg: dict, h: int, w: int, b: int = 2, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, cfg["in_channels"], h, w, generator=g)
    t = torch.rand(b, generator=g)
    txt = torch.randn(b, length, cfg["context_in_dim"], generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 4:] = False  # padding in the first sample
    txt[0, 4:] = 50.0  # loud padding: leaks into the output if the mask is ignored
    return img, t, txt, mask


def pair(cfg: dict) -> tuple[PRXTransformer, PRXTransformer2DModel]:
    theirs = PRXTransformer2DModel(**cfg).eval()
    randomise(theirs)
    ours = PRXTransformer(**cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize(
    "cfg, size",
    [(PIXEL, (16, 24)), (LATENT, (12, 8)), (dict(PIXEL, resolution_embeds=True), (8, 20))],
    ids=["pixel-bottleneck", "latent", "pixel-resolution-embeds"],
)
def test_matches_diffusers(cfg, size):
    ours, theirs = pair(cfg)
    img, t, txt, mask = inputs(cfg, *size)
    with torch.no_grad():
        want = theirs(img, t, txt, attention_mask=mask, return_dict=False)[0]
        got = ours(img, t, txt, attention_mask=mask)
        unmasked = ours(img, t, txt)
        want_unmasked = theirs(img, t, txt, return_dict=False)[0]
    assert got.shape == img.shape
    assert (got - want).abs().max() < 1e-5
    assert (unmasked - want_unmasked).abs().max() < 1e-5
    assert (unmasked - got)[0].abs().max() > 1e-2  # the padding mask matters for sample 0...
    assert (unmasked - got)[1].abs().max() == 0  # ...and an all-valid row takes the same path as no mask
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_prx_small_parameter_count_matches_diffusers():
    cfg = preset("prx-small")
    with torch.device("meta"):
        ours = build_transformer(**cfg)
        theirs = PRXTransformer2DModel(**cfg)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert 1.1e9 < n < 1.3e9
    assert ours.num_tokens(512, 512) == 256 and ours.num_tokens(1024, 1024) == 1024
    assert (ours.patch_size, ours.in_channels, ours.hidden_size, ours.depth) == (32, 3, 1792, 16)
    assert ours.config == {**cfg, "resolution_embeds": False}


class Recorder:
    def __init__(self):
        self.seen: list[tuple[str, int, tuple]] = []

    def before_block(self, i: int, state: TokenState) -> TokenState:
        self.seen.append(("before", i, tuple(state.x.shape)))
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        self.seen.append(("after", i, tuple(state.x.shape)))
        return state


class Route:
    """Runs blocks [start, end] on the tokens at stream positions `keep` (B, K), then scatters them back."""

    def __init__(self, keep: torch.Tensor, start: int, end: int):
        self.keep, self.start, self.end = keep, start, end

    def before_block(self, i: int, state: TokenState) -> TokenState:
        if i == self.start:
            self.full = state
            return state.take(self.keep)
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        if i != self.end:
            return state
        assert torch.equal(state.index, gather_tokens(self.full.index, self.keep))
        idx = self.keep[..., None].expand(-1, -1, state.x.shape[-1])
        return self.full.with_x(self.full.x.scatter(1, idx, state.x))


def tiny_model() -> PRXTransformer:
    model = build_transformer(**preset("tiny")).eval()
    randomise(model)
    return model


def test_hooks_see_every_block_and_identity_hooks_change_nothing():
    model = tiny_model()
    img, t, txt, mask = inputs(model.config, 16, 12)
    rec = Recorder()
    with torch.no_grad():
        plain = model(img, t, txt, mask)
        hooked = model(img, t, txt, mask, hooks=[rec, Recorder()])
    assert torch.equal(plain, hooked)
    n = model.num_tokens(16, 12)
    assert rec.seen == [(w, i, (2, n, 64)) for i in range(4) for w in ("before", "after")]


def test_routing_a_permutation_of_all_tokens_is_exact_and_dropping_tokens_runs():
    model = tiny_model()
    img, t, txt, mask = inputs(model.config, 16, 12)
    n = model.num_tokens(16, 12)
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])
    half = perm[:, : n // 2]
    rec = Recorder()
    with torch.no_grad():
        dense = model(img, t, txt, mask)
        permuted = model(img, t, txt, mask, hooks=[Route(perm, 1, 2)])  # RoPE and index travel with the tokens
        routed = model(img, t, txt, mask, hooks=[Route(half, 1, 2), rec])
    assert (permuted - dense).abs().max() < 1e-5
    assert [s[2][1] for s in rec.seen] == [n, n, n // 2, n // 2, n // 2, n, n, n]  # Route restores before rec
    assert routed.shape == dense.shape and torch.isfinite(routed).all()
    assert (routed - dense).abs().max() > 1e-3


def test_hooks_must_restore_all_tokens():
    model = tiny_model()
    img, t, txt, mask = inputs(model.config, 8, 8)
    drop = Route(torch.zeros(2, 1, dtype=torch.long), 0, 99)
    with pytest.raises(ValueError, match="restore"):
        model(img, t, txt, mask, hooks=[drop])


def test_gradient_reaches_every_parameter():
    model = tiny_model().train()
    img, t, txt, mask = inputs(model.config, 8, 12)
    model(img, t, txt, mask).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def test_fresh_model_predicts_zero_and_only_the_final_linear_learns_first():
    torch.manual_seed(0)
    model = build_transformer(**preset("tiny"))
    img, t, txt, mask = inputs(model.config, 8, 8)
    out = model(img, t, txt, mask)
    assert torch.equal(out, torch.zeros_like(out))
    (out - img).square().mean().backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert moved == {"final_layer.linear.weight", "final_layer.linear.bias"}


def test_rope_table_is_cached_and_not_state():
    model = tiny_model()
    img, t, txt, _ = inputs(model.config, 8, 16)
    with torch.inference_mode():
        model(img, t, txt)
    assert list(model._rope_cache) == [(2, 4, torch.device("cpu"))]
    assert not any("rope" in k for k in model.state_dict())
    model.train()
    model(img, t, txt).sum().backward()  # a table built under inference_mode still works with autograd


def test_user_errors():
    with pytest.raises(UserError, match="divisible"):
        PRXTransformer(**dict(PIXEL, num_heads=3))
    with pytest.raises(UserError, match="axes_dim"):
        PRXTransformer(**dict(PIXEL, axes_dim=[8, 6]))
    with pytest.raises(UserError, match="tiny"):
        preset("huge")
    model = PRXTransformer(**PIXEL)
    img, t, txt, mask = inputs(PIXEL, 8, 8)
    with pytest.raises(UserError, match="patch size"):
        model.num_tokens(10, 8)
    with pytest.raises(UserError, match="mask"):
        model(img, t, txt, mask[:, :3])
    assert set(PRESETS) == {"prx-small", "prx-small-latent", "tiny", "demo"}


def test_rope_complex_and_compiled_forms_are_bitwise_equal(monkeypatch):
    from daybreak.model.layers import apply_rope, rope_table

    rope = rope_table(3, 4, [8, 8], 10000, torch.device("cpu")).expand(2, -1, -1, -1)
    x = torch.randn(2, 12, 3, 16, generator=torch.Generator().manual_seed(0))
    eager = apply_rope(x, rope)  # complex multiply
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = apply_rope(x, rope)  # the form inductor fuses
    assert torch.equal(eager, real)
    # hand-worked: token 5 is row 1, col 1; its first pair turns by angle 1 (row axis, frequency 1)
    x0, x1 = x[0, 5, 0, 0], x[0, 5, 0, 1]
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(real[0, 5, 0, :2], torch.stack([x0 * c - x1 * s, x1 * c + x0 * s]))
