"""The download-free text tower on one's own captions: its tokenizer is learned from the run's data,
kept across a resume, carried by every checkpoint, and the demo model exports as a complete
diffusers pipeline that samples what `daybreak sample` samples.

The own-data test is the worked example of docs/data.md ("the demo config on your own captioned folder"):
its `daybreak train` command, on one thread, on an image folder whose colours are named with invented words.
"""

import json

import diffusers
import numpy as np
import pytest
import torch

import daybreak.build
from daybreak.config import load_config
from daybreak.data.shapes import render
from daybreak.diffusion.sampling import sigma_schedule
from daybreak.evaluate.adherence import judge
from daybreak.export import export
from daybreak.pipeline import generate
from daybreak.run import build_trainer
from helpers import background_cli, tiny

# invented colour names: none is in the shapes grammar, so only a tokenizer learned from these
# captions can tell them apart (a fixed vocabulary reads every one as <unk>)
NAMES = {"zorp": "red", "blick": "green", "quaddle": "blue", "fimbo": "yellow", "snarv": "white"}
OWN_STEPS, OWN_BATCH, OWN_SIZE, SAMPLE_STEPS = 300, 16, 16, 12
OWN_ARGS = [f"train.steps={OWN_STEPS}", f"train.global_batch={OWN_BATCH}", f"train.micro_batch={OWN_BATCH}",
            f"train.checkpoint_every={OWN_STEPS}", f"data.image_size={OWN_SIZE}", "optim.warmup_steps=20",
            "ema.decay=0.97", "objective.shift=1", "objective.shift_end=null", "sample.prompts=[]"]
# a short run wants a short EMA (0.97^300 ≈ 0); 16 px wants less noise than the demo's 32 px, so a constant
# shift 1 instead of its 3 -> 1 anneal (one 400-step run each on this folder: 100 % colour, against 60 % annealed;
# 300 steps at shift 1: 95 %)


def make_folder(root, n=200, seed=0):
    """`n` 32 px images of one blob each (trained at 16 px), captioned "a photo of a <name> blob" (+ filler)."""
    rng = np.random.default_rng(seed)
    names = list(NAMES)
    fillers = ["", ", on a dark background", ", plain and simple"]
    for i in range(n):
        name = names[i % len(names)]
        shape = ("circle", "square")[rng.integers(2)]
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        render(NAMES[name], shape, cx, cy, rng.uniform(0.12, 0.2), "black", 32).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"a photo of a {name} blob{fillers[rng.integers(3)]}")
    return root


@background_cli
def own_folder(root):
    """The command docs/data.md gives, on 200 generated images, run by the suite in the background."""
    (root / "images").mkdir()
    return ["train", "demo", "data.source=imagefolder", f"data.path={make_folder(root / 'images')}",
            f"run.dir={root / 'run'}", *OWN_ARGS]


@pytest.fixture(scope="module")
def own_run(background_run):
    root, seconds = background_run(own_folder)
    return root / "run" / "final", seconds


def test_demo_config_learns_invented_colour_words_from_own_folder(own_run, capsys):
    final, seconds = own_run
    tokenizer = daybreak.build.build_text(load_config(final / "config.yaml"), final / "tokenizer").tokenizer
    for name in NAMES:  # each invented word is one learned token
        assert len(tokenizer(name)["input_ids"]) == 2
    prompts = [f"a photo of a {name} blob" for name in NAMES for _ in range(4)]
    images = generate(final, prompts, seed=0, steps=SAMPLE_STEPS)
    colours = [judge(im)[0] for im in images]
    wanted = [NAMES[name] for name in NAMES for _ in range(4)]
    share = np.mean([c == w for c, w in zip(colours, wanted)])
    with capsys.disabled():  # the figures docs/data.md quotes
        print(f"\nown folder: {OWN_STEPS} steps × {OWN_BATCH} images of {OWN_SIZE} px in {seconds:.0f} s; colour adherence "
              f"{share:.0%} on {len(prompts)} prompts (chance 20%), vocabulary {len(tokenizer)} tokens")
    assert share >= 0.8, list(zip(prompts, colours))


def test_demo_model_exports_a_pipeline_that_samples_like_daybreak(own_run, tmp_path, capsys):
    final, _ = own_run
    out = export(final, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer"]
    assert "load with" in capsys.readouterr().out
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "PRXPixelPipeline"
    assert type(pipe.text_encoder).__name__ == "DistilBertModel"
    cfg = load_config(final / "config.yaml")
    prompts = ["a photo of a zorp blob", "a photo of a quaddle blob, plain and simple"]
    ours = generate(final, prompts, seed=7, steps=SAMPLE_STEPS, cfg=cfg.sample.cfg)
    # the schedule as export documents it: shift 1 and daybreak's own sigmas as timesteps
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    timesteps = (1000 * sigma_schedule(SAMPLE_STEPS, cfg.sample.shift)[:-1]).tolist()
    for i, (prompt, mine) in enumerate(zip(prompts, ours)):
        theirs = pipe(prompt, generator=torch.Generator().manual_seed(7 + i), guidance_scale=cfg.sample.cfg,
                      timesteps=timesteps, use_resolution_binning=False).images[0]
        diff = np.abs(np.asarray(mine, dtype=int) - np.asarray(theirs, dtype=int))
        assert diff.max() <= 1, (prompt, diff.max())
    # words the training captions never had still reach the model, as learned pieces
    ids = pipe.tokenizer("a purple zebra")["input_ids"]
    assert pipe.tokenizer.unk_token_id not in ids and len(ids) > 3


def test_a_resumed_run_keeps_its_tokenizer(finished_run_copy, monkeypatch):
    run = finished_run_copy  # 2 steps, checkpoint_every=1
    learned = (run / "tokenizer" / "tokenizer.json").read_text()
    assert json.loads(learned)["model"]["type"] == "BPE"

    def no_retraining(cfg):
        raise AssertionError("a resumed run trained a new tokenizer")

    monkeypatch.setattr(daybreak.build, "demo_tokenizer", no_retraining)
    monkeypatch.setattr("daybreak.run.demo_tokenizer", no_retraining)
    final = build_trainer(tiny(run, "train.steps=3", "train.checkpoint_every=1"), progress=False,
                          allow_changed=["train.steps"]).fit()
    for ckpt in (final, run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000003"):
        assert (ckpt / "tokenizer" / "tokenizer.json").read_text() == learned
    generate(final, ["a red circle on the left"], steps=2)  # the checkpoint samples with its own tokenizer
