"""The command line end to end on the tiny config: train, resume, sample, load_model, and bad input."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import daybreak
from daybreak.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daybreak", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["train", "tiny", f"run.dir={run_dir}", "train.steps=4", "train.checkpoint_every=2",
                 "--no-progress"]) == 0
    return run_dir


def test_train_writes_the_run_directory(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "final/meta.json", "final/transformer_ema.safetensors",
                 "checkpoints/step_0000002/meta.json", "samples/final.png"):
        assert (tiny_run / name).exists(), name
    assert any((tiny_run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["loss"] > 0


def test_resume_prints_and_continues(tiny_run, capsys):
    assert main(["train", "tiny", f"run.dir={tiny_run}", "train.steps=6", "train.checkpoint_every=2",
                 "--no-progress", "--allow-changed=train.steps"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out  # final/ holds the full state too
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6


def test_sample_and_load_model(tiny_run, tmp_path):
    out = tmp_path / "x.png"
    assert main(["sample", str(tiny_run / "final"), "--prompt", "a red circle on the left", "--out", str(out),
                 "--steps", "3"]) == 0
    img = Image.open(out)
    assert img.size == (32, 32) and "a red circle on the left" in img.text["daybreak"]
    d = tmp_path / "many/"
    assert main(["sample", str(tiny_run / "final"), "--prompt", "a red circle on the left", "--prompt",
                 "a blue square on the top", "--out", str(d) + "/", "--steps", "3", "--seed", "5"]) == 0
    assert {p.name for p in d.iterdir()} == {"000.png", "001.png", "grid.png"}
    # prompt i uses seed S + i: image 1 equals a single run of prompt 1 with seed 6
    single = tmp_path / "one.png"
    main(["sample", str(tiny_run / "final"), "--prompt", "a blue square on the top", "--out", str(single),
          "--steps", "3", "--seed", "6"])
    assert list(Image.open(single).getdata()) == list(Image.open(d / "001.png").getdata())

    model = daybreak.load_model(tiny_run / "final")
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([0.5, 1.0]), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == x.shape and torch.isfinite(out).all()
    raw = daybreak.load_model(tiny_run / "final", ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw.state_dict().values()))
    images = daybreak.generate(tiny_run / "final", ["a red circle on the left"], seed=0, steps=3)
    assert images[0].size == (32, 32)


def test_save_samples_writes_what_the_cli_writes(tiny_run, tmp_path, capsys):
    from daybreak.errors import UserError

    prompts = ["a red circle on the left", "a blue square on the top"]
    cli = tmp_path / "cli"
    assert main(["sample", str(tiny_run / "final"), "--prompt", prompts[0], "--prompt", prompts[1], "--out",
                 f"{cli}/", "--steps", "2", "--seed", "5", "--captions"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 images and grid.png to {cli}"
    lib = tmp_path / "lib"
    written = daybreak.save_samples(tiny_run / "final", prompts, f"{lib}/", seed=5, steps=2, captions=True)
    assert written == [lib / "000.png", lib / "001.png", lib / "grid.png"]
    assert {p.name for p in cli.iterdir()} == {p.name for p in lib.iterdir()}
    assert all((cli / p.name).read_bytes() == p.read_bytes() for p in written)  # pixels and metadata alike
    assert json.loads(Image.open(lib / "001.png").text["daybreak"]) == {"prompt": prompts[1], "seed": 6, "steps": 2}
    with pytest.raises(UserError, match="exists and is not empty; choose another or add --force"):
        daybreak.save_samples(tiny_run / "final", prompts, lib, seed=5, steps=2)  # an existing directory
    before = (lib / "000.png").read_bytes()
    daybreak.save_samples(tiny_run / "final", prompts[:1], lib, seed=7, steps=2, force=True)
    assert (lib / "000.png").read_bytes() != before and (lib / "001.png").read_bytes() == (cli / "001.png").read_bytes()


@pytest.mark.parametrize("args, needle", [
    (["train", "tiny", "train.stepz=1"], "unknown config key 'train.stepz'"),
    (["train", "tiny", "train.steps=many"], "train.steps"),
    (["sample", "/no/such/ckpt", "--prompt", "a", "--out", "x.png"], "not found"),
    (["train", "no-such-config"], "not found"),
])
def test_bad_input_is_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_prompt(tiny_run):
    r = run_cli("sample", str(tiny_run / "final"), "--prompt", "  ", "--out", "x.png")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_demo_command_writes_its_outputs(tmp_path, capsys):
    from daybreak.config import load_config
    from daybreak.demo import DEMO_MINUTES

    out = tmp_path / "demo"
    minutes = 2 * DEMO_MINUTES / load_config("demo").train.steps  # --minutes scales the fixed steps: to 2 here
    assert main(["demo", "--out", str(out), "--minutes", str(minutes), "train.log_every=1", "sample.steps=2",
                 "model.depth=2", "text.tokenizer_sample=500"]) == 0
    printed = capsys.readouterr().out
    assert "(2 steps of 32 images)" in printed and "prompt adherence:" in printed and "patch seam:" in printed
    for name in ("final/transformer_ema.safetensors", "final/tokenizer/tokenizer.json", "samples/demo_grid.png",
                 "samples/adherence.json", "loss.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "samples" / "adherence.json").read_text())
    assert 0.0 <= result["adherence"] <= min(result[f"adherence_{k}"] for k in ("color", "shape", "position"))
    assert result["prompts"] >= 30 and result["patch_seam"]["training_images"] == pytest.approx(0.44, abs=0.05)


def test_data_bench_measures_one_rank_of_many(capsys):
    args = ["data", "bench", "shapes", "--batch", "2", "--seconds", "0.2", "--workers", "0", "--resolution", "64"]
    assert main([*args, "--world-size", "4", "--rank", "3"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["world_size"], r["rank"], r["batch"], r["global_batch"]) == (4, 3, 2, 8)
    assert r["main_ms_per_step"] > 0 and r["steps"] >= 1
    assert main([*args, "--world-size", "4", "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "--rank" in err and len(err.strip().splitlines()) == 1
