"""Resolution-aware conditioning (PRX's prx/algorithm/resolution_aware.py) against independent references:
mode token = the two tokens, computed here from PRX's formula, put in front of the projected text by hand;
mode vec = diffusers' PRXTransformer2DModel(resolution_embeds=True) with the same weights."""

import math

import pytest
import torch

import daybreak  # noqa: F401  (torchvision fix before diffusers imports it)
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model import build_transformer
from daybreak.recipe.resolution_aware import ResolutionAware, ResolutionAwareConfig

KW = dict(in_channels=3, patch_size=4, context_in_dim=32, hidden_size=32, num_heads=2, depth=2, axes_dim=[8, 8],
          bottleneck_size=None)


def perturbed(model):
    """Random weights everywhere (a fresh PRX model predicts exactly zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(h=16, w=24):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return torch.randn(2, 3, h, w, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32, generator=g), mask


def sinusoid(size: float, max_period: float) -> torch.Tensor:
    """PRX's timestep_embedding(size, dim=128, max_period, time_factor=1.0): cos then sin of size·freqs."""
    freqs = torch.tensor([math.exp(-math.log(max_period) * i / 64) for i in range(64)])
    return torch.cat([torch.cos(size * freqs), torch.sin(size * freqs)])[None].expand(2, -1)


def test_token_mode_is_two_text_tokens_in_front_of_the_projected_text():
    model = perturbed(build_transformer(**KW))
    with torch.no_grad():  # txt_in = identity, so text fed in already "projected" needs no inverse
        model.txt_in.weight.copy_(torch.eye(32))
        model.txt_in.bias.zero_()
    torch.manual_seed(2)
    ing = ResolutionAware(ResolutionAwareConfig(mode="token", max_period=1000), 32)
    x, t, txt, mask = inputs()
    emb = ing.resolution_embedder
    with torch.no_grad():
        tokens = torch.stack([emb.h_embedder(sinusoid(16, 1000)), emb.w_embedder(sinusoid(24, 1000))], dim=1)
        ref = model(x, t, torch.cat([tokens, txt], 1), torch.cat([torch.ones(2, 2, dtype=torch.bool), mask], 1))
        got = model(x, t, txt, mask, hooks=ing.dense_hooks())
        plain = model(x, t, txt, mask)
        unmasked = model(x, t, txt, None, hooks=ing.dense_hooks())
        ref_unmasked = model(x, t, torch.cat([tokens, txt], 1), None)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unmasked, ref_unmasked, atol=1e-6, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the size reaches the output
    assert [n for n, _ in ing.named_parameters()][:2] == ["resolution_embedder.h_embedder.in_layer.weight",
                                                          "resolution_embedder.h_embedder.in_layer.bias"]


def test_vec_mode_is_diffusers_resolution_embeds():
    from diffusers import PRXTransformer2DModel

    model = perturbed(build_transformer(**KW))
    torch.manual_seed(2)
    ing = ResolutionAware(ResolutionAwareConfig(mode="vec", max_period=10000), 32)
    ref = PRXTransformer2DModel(**KW, resolution_embeds=True).eval()
    ref.load_state_dict({**model.state_dict(), **ing.state_dict()}, strict=True)
    x, t, txt, mask = inputs()
    with torch.no_grad():
        got = model(x, t, txt, mask, hooks=ing.dense_hooks())
        want = ref(x, t, txt, attention_mask=mask, return_dict=False)[0]
        plain = model(x, t, txt, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_config_section_and_one_line_errors():
    cfg = load_config("tiny", ["resolution_aware.enabled=true"])
    assert (cfg.resolution_aware.mode, cfg.resolution_aware.max_period) == ("token", 10000)  # PRX's defaults
    with pytest.raises(UserError, match="'resolution_aware.mode' must be one of token, vec; got 'tokens'"):
        load_config("tiny", ["resolution_aware.enabled=true", "resolution_aware.mode=tokens"])
    with pytest.raises(UserError, match="'resolution_aware.max_period' must be >= 2"):
        load_config("tiny", ["resolution_aware.enabled=true", "resolution_aware.max_period=0"])


def test_self_guidance_routed_branch_is_conditioned_on_the_size_too(monkeypatch):
    """The routed forward of self-guidance runs the routers' routed hooks and every other ingredient's own."""
    from daybreak.build import build_parts, build_recipe
    from daybreak.pipeline import Pipeline
    from daybreak.recipe.resolution_aware import ResolutionHook

    cfg = load_config("tiny", ["resolution_aware.enabled=true", "tread.enabled=true", "tread.start=1", "tread.end=2",
                               "data.image_size=16", "text.tokenizer_sample=50", "data.length=50"])
    parts = build_parts(cfg)
    parts.ingredients = build_recipe(cfg, parts, inference=True)
    sizes = []
    real = ResolutionHook.condition
    monkeypatch.setattr(ResolutionHook, "condition", lambda self, txt, mask, vec, size: (
        sizes.append((txt.shape[0], size)), real(self, txt, mask, vec, size))[1])
    pipe = Pipeline(parts, cfg, torch.device("cpu"))
    predictor = pipe.predictor(["a red circle"], torch.Generator().manual_seed(0))
    predictor.predict(torch.randn(1, 3, 16, 16), torch.tensor([0.5]), ("cond", "uncond", "routed"))
    assert sizes == [(2, (16, 16)), (1, (16, 16))]  # the batched dense pass, then the routed one
