"""Ablation studies: printed commands, resume of finished variants, and the report's Δ arithmetic."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

import daybreak.run
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.study import ablate
from daybreak.study.ablate import commands, load_study, run_study, variant_overrides
from daybreak.study.report import build_report, study_rows

ROOT = Path(__file__).resolve().parents[2]
FAST = {"train.steps": 2, "train.checkpoint_every": 1, "eval.steps": 2, "sample.prompts": []}


def write_study(tmp_path: Path, variants: list[dict], **extra) -> Path:
    spec = {"name": "t", "config": "tiny", "out": str(tmp_path / "out"), "metrics": ["fd_tiny", "adherence"],
            "num": 4, "overrides": FAST, "variants": variants, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def finished_study(path: Path, fd_tiny: dict[str, list[float]]) -> tuple[Path, list[tuple[Path, str, int]]]:
    """The study folder of `path` as `daybreak ablate` leaves it: its study.yaml and one result.json per
    variant and seed (fd_tiny as given, adherence 0.5); returns it and each run's (folder, variant, seed)."""
    study_dir = path.parent / "out"
    study_dir.mkdir()
    (study_dir / "study.yaml").write_text(path.read_text())
    runs = []
    for name, fds in fd_tiny.items():
        for k, fd in enumerate(fds):
            d = study_dir / (name if k == 0 else f"{name}.seed{k}")
            d.mkdir()
            (d / "result.json").write_text(json.dumps({"metrics": {"fd_tiny": fd, "adherence": 0.5}, "step": 2,
                                                       "throughput": None, "train_s": 10.0, "curve": []}))
            runs.append((d, name, k))
    return study_dir, runs


def test_dry_run_prints_commands_that_parse_back(tmp_path, capsys):
    path = write_study(tmp_path, [
        {"name": "baseline"},
        {"name": "short", "overrides": {"data.captions": {"short": 1.0}, "optim.name": "adamw"}},
        {"name": "repa", "needs": "a DINOv2 teacher", "overrides": {"repa.enabled": True}},
    ])
    run_study(path, dry_run=True)
    out = capsys.readouterr().out
    assert "# repa: skipped, needs a DINOv2 teacher" in out
    trains = [shlex.split(line) for line in out.splitlines() if line.startswith("daybreak train")]
    evals = [line for line in out.splitlines() if line.startswith("daybreak eval")]
    assert len(trains) == 2 and len(evals) == 2
    assert f"--metrics fd_tiny,adherence --num 4 --out {tmp_path}/out/short/eval/final.json" in evals[1]
    cfg = load_config(trains[1][2], trains[1][3:])  # what `daybreak train CONFIG key=value ...` builds
    assert cfg.data.captions == {"short": 1.0} and cfg.optim.name == "adamw"
    assert cfg.run.dir == str(tmp_path / "out" / "short") and cfg.train.steps == 2
    assert not (tmp_path / "out").exists()


def test_study_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no variant named 'nope'"):
        load_study(write_study(tmp_path, [{"name": "a", "compare_to": "nope"}]))
    with pytest.raises(UserError, match="unknown key 'overide'"):
        load_study(write_study(tmp_path, [{"name": "a", "overide": {}}]))


def test_bundled_studies_load_and_demo_variants_are_valid_configs():
    prx = load_study(ROOT / "studies/prx-ablations.yaml")
    assert prx.variant("baseline").article["fid"] == 18.2
    assert prx.variant("repa-e").article["fid"] == 12.08
    assert len(commands(prx)) > 3 * 10
    demo = load_study(ROOT / "studies/demo-ablations.yaml")
    assert [v.name for v in demo.variants] == [v.name for v in prx.variants]  # every ablation, same order
    for v in demo.variants:
        if not v.needs:
            load_config(demo.config_of(v), variant_overrides(demo, v))


def test_finished_variants_are_not_rerun(tmp_path, monkeypatch):
    path = write_study(tmp_path, [{"name": "baseline"}, {"name": "muon", "overrides": {"optim.name": "muon"}},
                                  {"name": "bf16", "needs": "bf16 matrix units"}])
    out = run_study(path, log=lambda *a: None)
    for name in ("baseline", "muon"):
        result = json.loads((out / name / "result.json").read_text())
        assert result["step"] == 2 and [c["step"] for c in result["curve"]] == [1, 2]
        assert result["throughput"]["images_per_s"] > 0 and 0 <= result["metrics"]["adherence"] <= 1
    assert not (out / "bf16").exists()

    def no_training(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(daybreak.run, "train", no_training)
    before = (out / "muon" / "result.json").read_text()
    lines = []
    run_study(path, log=lines.append)
    assert "[t] baseline: finished earlier" in lines and (out / "muon" / "result.json").read_text() == before

    # Killed after training, before its result: evaluated again from cached eval JSONs, not retrained.
    (out / "muon" / "result.json").unlink()
    monkeypatch.setattr(ablate, "evaluate_checkpoint", no_training)
    run_study(path, log=lambda *a: None)
    assert json.loads((out / "muon" / "result.json").read_text())["metrics"] == json.loads(before)["metrics"]


def test_report_deltas_by_hand(tmp_path):
    path = write_study(tmp_path, [
        {"name": "baseline", "article": {"fid": 18.2}},
        {"name": "worse", "article": {"fid": 36.84}},
        {"name": "better", "article": {"fid": 12.08}},
        {"name": "hires-base", "article": {"fid": 17.42}},
        {"name": "hires-tread", "compare_to": "hires-base", "article": {"fid": 14.10}},
        {"name": "skipped", "needs": "weights"},
    ], primary="fd_tiny")
    study_dir = tmp_path / "out"
    study_dir.mkdir()
    (study_dir / "study.yaml").write_text(path.read_text())
    measured = {"baseline": (10.0, 0.5, 100.0), "worse": (12.5, 0.25, 90.0), "better": (8.0, 0.75, 125.0),
                "hires-base": (20.0, 0.1, 40.0), "hires-tread": (21.0, 0.2, 50.0)}
    for name, (fd, adh, ips) in measured.items():
        (study_dir / name).mkdir()
        result = {"metrics": {"fd_tiny": fd, "adherence": adh}, "step": 2, "train_s": 60.0,
                  "throughput": {"images_per_s": ips, "batches_per_s": ips / 8},
                  "curve": [{"step": 1, "fd_tiny": fd + 1, "adherence": adh}, {"step": 2, "fd_tiny": fd, "adherence": adh}]}
        (study_dir / name / "result.json").write_text(json.dumps(result))
    rows = {r["name"]: r for r in study_rows(load_study(study_dir / "study.yaml"),
                                             {n: [json.loads((study_dir / n / "result.json").read_text())]
                                              for n in measured})}
    assert rows["worse"]["delta"] == pytest.approx({"fd_tiny": 2.5, "adherence": -0.25})
    assert rows["worse"]["throughput_delta_pct"] == pytest.approx(-10.0)
    assert rows["worse"]["article_delta"] == pytest.approx(18.64) and rows["worse"]["agrees"] is True
    assert rows["better"]["throughput_delta_pct"] == pytest.approx(25.0) and rows["better"]["agrees"] is True
    assert rows["hires-tread"]["delta"]["fd_tiny"] == pytest.approx(1.0)  # against hires-base, not baseline
    assert rows["hires-tread"]["throughput_delta_pct"] == pytest.approx(25.0)
    assert rows["hires-tread"]["article_delta"] == pytest.approx(-3.32) and rows["hires-tread"]["agrees"] is False
    assert rows["baseline"]["delta"] == {} and "agrees" not in rows["baseline"]
    assert rows["skipped"]["status"] == "skipped"

    md = build_report(study_dir).read_text()
    assert "| worse | baseline | 1 | 12.500 | +2.500 | 0.250 | -0.250 | 90.0 | -10.0 % | 60 | 36.84 | +18.64 | yes |" in md
    assert "| skipped (skipped: needs weights) |" in md
    assert (study_dir / "report-curves.png").is_file() and (study_dir / "report.html").is_file()
    with pytest.raises(UserError, match="not a study directory"):
        build_report(tmp_path / "nowhere")


def test_seeds_print_one_run_per_seed_with_moved_seeds(tmp_path, capsys):
    path = write_study(tmp_path, [{"name": "baseline"}, {"name": "sft", "init_from": "baseline"}], seeds=2)
    run_study(path, dry_run=True, seeds=3)
    trains = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("daybreak train")]
    assert len(trains) == 2 * 3
    cfgs = {c.run.name: c for c in (load_config(t[2], t[3:]) for t in trains)}
    assert sorted(cfgs) == ["baseline", "baseline.seed1", "baseline.seed2", "sft", "sft.seed1", "sft.seed2"]
    assert [cfgs[n].seed for n in ("baseline", "baseline.seed1", "baseline.seed2")] == [0, 1, 2]
    assert cfgs["baseline.seed2"].eval.seed == 2 and cfgs["baseline.seed2"].run.dir == str(tmp_path / "out/baseline.seed2")
    assert cfgs["sft.seed1"].init_from == str(tmp_path / "out/baseline.seed1/final")  # the same seed's source
    with pytest.raises(UserError, match="positive integer"):
        load_study(write_study(tmp_path, [{"name": "a"}], seeds=0))


def test_report_means_spreads_and_the_noise_rule_by_hand(tmp_path):
    path = write_study(tmp_path, [{"name": "baseline"}, {"name": "big"}, {"name": "small"}], primary="fd_tiny")
    # fd_tiny per seed; adherence fixed. baseline: mean 10, sd 1; big: mean 14, sd 1 (Δ 4 > 1 + 1: real);
    # small: mean 11, sd 2 (Δ 1 < 1 + 2: within noise)
    study_dir, _ = finished_study(path, {"baseline": [9.0, 10.0, 11.0], "big": [13.0, 14.0, 15.0],
                                         "small": [9.0, 11.0, 13.0]})
    md = build_report(study_dir).read_text()
    assert "| baseline |  | 3 | 10.000 ± 1.000 | — | 0.500 ± 0.000 | — |" in md
    assert "| big | baseline | 3 | 14.000 ± 1.000 | +4.000* |" in md
    assert "| small | baseline | 3 | 11.000 ± 2.000 | +1.000 |" in md
    assert "larger than the two spreads added" in md


def test_check_lists_the_weights_with_their_keys(tmp_path, capsys):
    from daybreak.cli import main
    from daybreak.study.ablate import check_study

    teacher = tmp_path / "dinov2"
    teacher.mkdir()
    path = write_study(tmp_path, [
        {"name": "baseline"},
        {"name": "repa", "overrides": {"repa.enabled": True, "repa.teacher_path": str(teacher)}},
        {"name": "lpips", "needs": "VGG weights", "overrides": {"perceptual.enabled": True, "perceptual.dino_weight": 0.0,
                                                               "perceptual.lpips_vgg_path": "weights/nope.pth"}},
    ], metrics=["fd_tiny", "fid"])
    rows = {key: (p, ok, names) for key, p, ok, names in check_study(load_study(path), log=lambda *a: None)}
    assert rows["repa.teacher_path"] == (str(teacher), True, ["repa"])
    assert rows["perceptual.lpips_vgg_path"] == ("weights/nope.pth", False, ["lpips (skipped)"])
    assert rows["eval.inception_path"] == (None, False, ["baseline", "repa", "lpips (skipped)"])  # fid needs it
    assert main(["ablate", str(path), "--check"]) == 2
    captured = capsys.readouterr()
    assert "NOT SET  eval.inception_path" in captured.out and "set eval.inception_path" in captured.err
    assert "lpips_vgg_path" not in captured.err  # only a skipped variant needs it


def test_report_ranks_by_the_validation_loss_per_bin_by_hand(tmp_path):
    path = write_study(tmp_path, [{"name": "baseline"}, {"name": "better"}, {"name": "noisy"}], primary="val/loss")
    # val/loss at the last step per seed. baseline: mean 0.52, sd 0.02; better: 0.41, sd 0.01 (Δ −0.11 > 0.03:
    # real); noisy: 0.55, sd 0.10 (Δ +0.03 < 0.12: noise). The low bin is twice val/loss, the high bin 0.3.
    values = {"baseline": [0.50, 0.52, 0.54], "better": [0.40, 0.41, 0.42], "noisy": [0.45, 0.55, 0.65]}
    study_dir, runs = finished_study(path, {name: [1.0] * len(losses) for name, losses in values.items()})
    for d, name, k in runs:
        loss = values[name][k]
        rows = [{"step": 1, "loss": 1.0}, {"step": 1, "val/loss": 1.0, "val/loss_0.0-0.5": 2.0, "val/loss_0.5-1.0": 0.3},
                {"step": 2, "val/loss": loss, "val/loss_0.0-0.5": 2 * loss, "val/loss_0.5-1.0": 0.3}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = build_report(study_dir).read_text()
    ranked = md.split("## Validation loss per noise bin, best first")[1]
    assert ("| 1 | better | baseline | 3 | 0.410 ± 0.010 | -0.110* | 0.820 ± 0.020 | -0.220* | 0.300 ± 0.000 | +0.000 |"
            in ranked)
    assert "| 2 | baseline |  | 3 | 0.520 ± 0.020 | — | 1.040 ± 0.040 | — | 0.300 ± 0.000 | — |" in ranked
    assert "| 3 | noisy | baseline | 3 | 0.550 ± 0.100 | +0.030 | 1.100 ± 0.200 | +0.060 |" in ranked
    # the main table gets a column per bin, mean ± sd
    assert "| Δ adherence | val/loss | val/loss_0.0-0.5 | val/loss_0.5-1.0 | img/s |" in md
    assert "| baseline |  | 3 | 1.000 ± 0.000 | — | 0.500 ± 0.000 | — | 0.520 ± 0.020 | 1.040 ± 0.040 | 0.300 ± 0.000 |" in md
    assert (study_dir / "report-val.png").is_file()
