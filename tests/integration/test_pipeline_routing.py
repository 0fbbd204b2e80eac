"""Sampling a routed model uses its trained routing parts: SPRINT's fusion in the dense forward, and
the router for self-guidance's routed branch."""

import torch
from safetensors.torch import load_file

from daybreak.config import load_config
from daybreak.pipeline import load_pipeline
from daybreak.run import train


def test_sprint_checkpoint_samples_with_its_fusion(tmp_path):
    final = train(load_config("tiny", [f"run.dir={tmp_path}", "train.steps=3", "sprint.enabled=true",
                                       "sprint.start=1", "sprint.end=2", "sample.prompts=[]"]), progress=False)
    pipe = load_pipeline(final)
    (sprint,) = pipe.ingredients
    saved = load_file(str(final / "recipe_ema.safetensors"))  # the EMA fusion, with the EMA blocks
    assert torch.equal(sprint.fusion.weight.cpu(), saved["sprint.fusion.weight"])
    assert not torch.equal(saved["sprint.fusion.weight"], torch.eye(64).repeat(1, 2))  # trained, not the identity init
    prompts = ["a red circle on the left"]
    with_fusion = pipe(prompts, seed=0, steps=2, guidance="none")[0]
    pipe.ingredients = []
    without = pipe(prompts, seed=0, steps=2, guidance="none")[0]
    assert list(with_fusion.getdata()) != list(without.getdata())


def test_self_guidance_on_a_tread_checkpoint(tmp_path):
    final = train(load_config("tiny", [f"run.dir={tmp_path}", "train.steps=2", "tread.enabled=true",
                                       "tread.start=1", "tread.end=2", "sample.prompts=[]"]), progress=False)
    pipe = load_pipeline(final, ema=False)  # two steps' raw weights: the EMA is still near the zero-output init
    guided = pipe(["a blue square on the top"], seed=1, steps=2, guidance="self", cfg=3.0)[0]
    plain = pipe(["a blue square on the top"], seed=1, steps=2, guidance="none")[0]
    assert guided.size == (32, 32) and list(guided.getdata()) != list(plain.getdata())


def test_self_guidance_keeps_one_routed_subset_per_generation(tmp_path):
    from daybreak.build import build_parts, build_recipe
    from daybreak.pipeline import Pipeline

    cfg = load_config("tiny", [f"run.dir={tmp_path}", "tread.enabled=true", "tread.start=1", "tread.end=2"])
    torch.manual_seed(0)
    parts = build_parts(cfg)
    parts.ingredients = build_recipe(cfg, parts, inference=True)
    with torch.no_grad():  # a fresh model's zero-initialised output layers would hide the routing
        for p in parts.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = Pipeline(parts, cfg, torch.device("cpu"))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.7, 0.7])
    prompts = ["a red circle on the left", "a blue square on the top"]
    for redraw in (False, True):
        predict = pipe.predictor(prompts, torch.Generator().manual_seed(3), redraw=redraw).predict
        first, second = (predict(x, t, ("routed",))["routed"] for _ in range(2))
        assert torch.equal(first, second) != redraw  # PRX: the same subset at every step; redraw: a new one
    dense = pipe.predictor(prompts, torch.Generator().manual_seed(3)).predict(x, t, ("cond",))["cond"]
    assert (dense - first).abs().max() > 1e-4  # the routed branch is a different forward
