"""The bundled ablation configs equal PRX's own configs key for key (docs/prx-ablation-configs.yaml).

The table is written from Photoroom/PRX's Hydra files; here every mapped key is read back from the
resolved daybreak config, so a config edit that drifts from PRX (or from the table) fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daybreak.build import model_kwargs
from daybreak.config import load_config
from daybreak.study.ablate import check_study, load_study

ROOT = Path(__file__).resolve().parents[2]
TABLE = yaml.safe_load((ROOT / "docs/prx-ablation-configs.yaml").read_text())["configs"]
# SPEC section 1.2: every benchmark config of PRX's repository (JIT-debug.yaml is its JiT baseline renamed), and sft
NAMES = ["baseline", "ema", "repa-e", "short-captions", "repa-dinov2", "repa-dinov3", "irepa-dinov2", "irepa-dinov3",
         "contrastive", "muon", "bf16-weights", "tread", "sprint", "lpips", "perceptual-dino", "resolution-aware",
         "flux2", "qwen3vl", "jit-1024", "jit-1024-tread", "jit-1024-sprint", "jit-1024-ema", "jit-1024-lpips",
         "jit-1024-muon", "jit-1024-perceptual-dino", "jit-1024-repa-dinov2", "jit-1024-repa-dinov3", "jit-1024-repa-e",
         "jit-1024-contrastive", "jit-1024-resolution-aware", "sft"]


def expected(name: str) -> dict:
    """daybreak key → value for config `name`: its parent's rows, then its own."""
    entry = TABLE[name]
    rows = expected(entry["parent"]) if entry.get("parent") else {}
    return {**rows, **{r["key"]: r["value"] for r in entry["rows"] if "key" in r}}


def resolved(cfg, key: str):
    if key.startswith("model."):  # the preset with the explicit model.* keys on top
        return model_kwargs(cfg)[key.split(".", 1)[1]]
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_the_table_covers_exactly_the_spec_configs():
    assert sorted(TABLE) == sorted(NAMES)
    files = [e["prx_file"] for e in TABLE.values() if e["prx_file"]]
    assert len(files) == len(set(files)) == 30  # 18 FLUX-VAE benchmark files, 12 JiT ones
    assert sum(f.startswith("configs/yamls/JIT-benchmark/") for f in files) == 12
    bundled = {p.stem for p in (ROOT / "configs/ablations").glob("*.yaml")}
    assert bundled == set(NAMES) | {"demo-base"}


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_prx_key_for_key(name):
    cfg = load_config(f"ablations/{name}")
    for key, value in expected(name).items():
        got = resolved(cfg, key)
        if key == "sample.prompts":  # PRX's 49 image-monitor prompts (prompts/eval_prompts.yaml)
            assert len(got) == 49 and got[0].startswith("A curious tabby cat"), name
        else:
            assert got == value, f"{name}: {key} = {got!r}, PRX's config gives {value!r}"


def test_rows_say_why_when_unmatched_and_the_markdown_lists_every_row():
    md = (ROOT / "docs/prx-ablation-configs.md").read_text()
    for name, entry in TABLE.items():
        assert f"`ablations/{name}`" in md
        for row in entry["rows"]:
            assert "key" in row or row.get("why"), (name, row["prx"])
            assert row["prx"] in md, (name, row["prx"])


def test_the_study_lists_exactly_these_configs():
    study = load_study(ROOT / "studies/prx-ablations.yaml")
    assert [v.name for v in study.variants] == NAMES
    assert all(v.config == f"ablations/{v.name}" and not v.overrides for v in study.variants)
    assert study.variant("jit-1024-tread").compare_to == "jit-1024" and study.variant("sft").init_from == "baseline"
    assert all(study.reference_of(v) == ("jit-1024" if v.name.startswith("jit-1024-") else "baseline")
               for v in study.variants[1:])


def test_ablate_check_names_the_weights_of_the_new_parts():
    rows = check_study(load_study(ROOT / "studies/prx-ablations.yaml"), log=lambda *_: None)
    needs = {(key, path): names for key, path, _, names in rows}
    assert needs[("space.vae_path", "weights/flux2-vae")] == ["flux2"]  # FLUX.2's vae/ folder
    assert needs[("text.path", "weights/qwen3-vl-embedding-2b")] == ["qwen3vl"]  # Qwen/Qwen3-VL-Embedding-2B
    assert "jit-1024-repa-e (skipped)" in needs[("space.vae_path", "weights/repa-e-flux-vae")]


def test_speedrun_data_is_the_three_datasets_with_their_captions():
    stage1, stage2 = load_config("speedrun-512"), load_config("speedrun-1024")
    # the three public datasets, weighted by their sizes (1.7 M, 6 M, 1 M images), as published on the hub
    for stage in (stage1, stage2):
        assert [(e.name, e.source, e.weight) for e in stage.data.mix] == [
            ("flux_generated", "hf", 1.7), ("FLUX-Reason-6M", "hf", 6.0), ("midjourney-v6-llava", "hf", 1.0)]
    # pre-training: each dataset's long column only, as PRX
    assert [e.captions for e in stage1.data.mix] == [{"caption_caption": 1.0}, {"caption_detail": 1.0}, {"llava": 1.0}]
    # stage 2: long 80 %, short 20 % where a dataset has both, as the article advises for fine-tuning
    assert [e.captions for e in stage2.data.mix] == [
        {"caption_caption": 1.0}, {"caption_detail": 0.8, "caption_original": 0.2}, {"llava": 0.8, "prompt": 0.2}]
    moved = load_config("speedrun-512", ["data.mix.FLUX-Reason-6M.path=/d/fr", "data.mix.2.weight=2"]).data.mix
    assert (moved[1].name, moved[1].path, moved[2].weight) == ("FLUX-Reason-6M", "/d/fr", 2.0)


def test_config_command_prints_what_the_run_would_save(tmp_path, capsys):
    from daybreak.cli import main

    assert main(["config", "ablations/muon", "optim.lr=3e-4"]) == 0
    printed = capsys.readouterr().out
    assert printed == load_config("ablations/muon", ["optim.lr=3e-4"]).to_yaml()  # run.dir/config.yaml's text
    (tmp_path / "c.yaml").write_text(printed)
    assert load_config(tmp_path / "c.yaml") == load_config("ablations/muon", ["optim.lr=3e-4"])  # round trip

    assert main(["config", "ablations/ema", "--diff", "ablations/baseline"]) == 0
    diff = yaml.safe_load(capsys.readouterr().out)
    assert diff["ema.enabled"] == {"ablations/ema": True, "ablations/baseline": False}
    assert set(diff) == {"ema.enabled", "run.dir", "run.name"}  # decay 0.999 / every 10 are the defaults
    assert main(["config", "ablations/nope"]) == 2 and "not found" in capsys.readouterr().err
