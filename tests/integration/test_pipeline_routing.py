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
    saved = load_file(str(final / "recipe.safetensors"))
    assert torch.equal(sprint.fusion.weight.cpu(), saved["sprint.fusion.weight"])  # trained, not the identity init
    prompts = ["a red circle on the left"]
    with_fusion = pipe(prompts, seed=0, steps=2, guidance="none")[0]
    pipe.ingredients = []
    without = pipe(prompts, seed=0, steps=2, guidance="none")[0]
    assert list(with_fusion.getdata()) != list(without.getdata())


def test_self_guidance_on_a_tread_checkpoint(tmp_path):
    final = train(load_config("tiny", [f"run.dir={tmp_path}", "train.steps=2", "tread.enabled=true",
                                       "tread.start=1", "tread.end=2", "sample.prompts=[]"]), progress=False)
    pipe = load_pipeline(final)
    guided = pipe(["a blue square on the top"], seed=1, steps=2, guidance="self", cfg=3.0)[0]
    plain = pipe(["a blue square on the top"], seed=1, steps=2, guidance="none")[0]
    assert guided.size == (32, 32) and list(guided.getdata()) != list(plain.getdata())
