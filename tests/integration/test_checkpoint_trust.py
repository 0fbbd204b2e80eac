"""Checkpoints that cannot run code and are trusted only when whole (issues 17 and 13.5).

One tiny run (3 steps, a step checkpoint each step) is the source of every case:
- every file of a step checkpoint and of `final/` is listed in its manifest, in a format that cannot
  carry code (JSON, YAML, safetensors; DCP's tensors), and the trainer state round-trips exactly;
- a damaged newest checkpoint (truncated shard, missing shard, corrupt .metadata, bad manifest) is
  reported in one line, set aside (not deleted), and the run resumes from the previous one and ends
  bitwise where the undamaged run ended;
- planted checkpoints whose trainer state, RNG file or DCP metadata is a pickle that writes a file
  when loaded: train (resume), init_from, convert, sample, export and eval never run it and end with
  one line and exit code 2, with the manifest missing or forged to match.
"""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from daybreak.cli import main
from daybreak.io import checkpoint as ck
from daybreak.run import build_trainer
from helpers import SMALL, tiny

STEPS = ["train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5", "data.length=64"]
STEP_FILES = {".metadata", "__0_0.distcp", "config.yaml", "meta.json", "trainer.json", "rng/rank_00000.safetensors"}
FINAL_FILES = {"config.yaml", "meta.json", "transformer.safetensors", "transformer_ema.safetensors",
               "text_encoder.safetensors", "text_encoder_ema.safetensors"}
CODE_FREE = (".json", ".yaml", ".safetensors", ".distcp")  # and DCP's .metadata, read through an allow-list


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("trust") / "run"
    build_trainer(tiny(run, *STEPS), progress=False).fit()
    return run


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{n}/{k}": v for n in ("transformer", "transformer_ema", "text_encoder", "text_encoder_ema")
            for k, v in ck.load_tensors(ckpt, f"{n}.safetensors").items()}


def test_every_file_is_in_the_manifest_in_a_format_without_code(source, capsys):
    step = source / "checkpoints" / "step_0000002"
    for ckpt, expected in ((step, STEP_FILES), (source / "final", FINAL_FILES)):
        present = _files(ckpt)
        assert expected | {"manifest.json"} <= present
        assert all(n.endswith(CODE_FREE) or n == ".metadata" for n in present), present
        listed = json.loads((ckpt / "manifest.json").read_text())["files"]
        assert set(listed) == present - {"manifest.json"}
        assert all(listed[n]["size"] == (ckpt / n).stat().st_size for n in listed)
        assert ck.verify(ckpt) == ckpt
    load_file(str(step / "rng" / "rank_00000.safetensors"))
    saved = json.loads((step / "trainer.json").read_text())
    assert saved["step"] == 2 and "lr_lambdas" not in saved["schedulers"]["adamw"]
    # the state read back is the state written, exactly: a trainer resumed from step 2 reports the same
    trainer = build_trainer(tiny(source.parent / "roundtrip", *STEPS), progress=False)
    trainer.load(step)
    assert json.loads(json.dumps(trainer.state.small())) == saved


DAMAGE = {
    "truncated shard": lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:1000]),
    "missing shard": lambda d: (d / "__0_0.distcp").unlink(),
    "corrupt metadata": lambda d: (d / ".metadata").write_bytes(bytes(b ^ 0xFF for b in (d / ".metadata").read_bytes())),
    "bad manifest": lambda d: (d / "manifest.json").write_text('{"files": {'),
}
SAID = {"truncated shard": "__0_0.distcp has 1000 bytes", "missing shard": "__0_0.distcp is missing",
        "corrupt metadata": ".metadata does not match its sha256", "bad manifest": "manifest.json is unreadable"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumes(source, tmp_path, damage, capsys):
    run = tmp_path / "run"
    for step in ("step_0000001", "step_0000002"):
        shutil.copytree(source / "checkpoints" / step, run / "checkpoints" / step)
    DAMAGE[damage](run / "checkpoints" / "step_0000002")
    capsys.readouterr()
    final = build_trainer(tiny(run, *STEPS), progress=False).fit()
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "damaged" in line]
    assert len(warning) == 1 and SAID[damage] in warning[0], out
    assert "resuming from the previous complete checkpoint step_0000001" in warning[0]
    assert "resumed from step 1" in out
    aside = list((run / "checkpoints").glob("step_0000002.damaged-*"))
    assert len(aside) == 1 and (aside[0] / "config.yaml").is_file()  # kept, not deleted
    a, b = _weights(source / "final"), _weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dcp_errors_keep_their_cause(source, tmp_path, capsys):
    cut = tmp_path / "cut"  # a truncated shard under a manifest forged to match: DCP's own read fails
    shutil.copytree(source / "checkpoints" / "step_0000002", cut)
    (cut / "__0_0.distcp").write_bytes((cut / "__0_0.distcp").read_bytes()[:1000])
    ck.write_manifest(cut)
    assert main(["convert", str(cut), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not be read" in err and "does not match" not in err and len(err.strip().splitlines()) == 1
    # a real mismatch says so, with DCP's own words
    trainer = build_trainer(tiny(tmp_path / "wider", *STEPS, "model.hidden_size=32", "model.num_heads=2"), progress=False)
    with pytest.raises(ck.UserError, match=r"does not match this run's parameters \(\w+Error: .*"):
        trainer.load(source / "checkpoints" / "step_0000002")


class _Payload:
    """Unpickling this writes the file `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _plant(source: Path, dest: Path, marker: Path, forged_manifest: bool) -> Path:
    """A copy of step 2 whose trainer state and RNG file are pickles that write `marker` (trainer.pt, rng/);
    with `forged_manifest`, its DCP .metadata is such a pickle too and a manifest that matches is added."""
    shutil.copytree(source / "checkpoints" / "step_0000002", dest)
    for name in ("manifest.json", "trainer.json", "rng/rank_00000.safetensors"):
        (dest / name).unlink()
    evil = pickle.dumps(_Payload(marker))
    for name in ("trainer.pt", "rng/rank_00000.pt"):
        (dest / name).write_bytes(evil)
    if forged_manifest:
        (dest / ".metadata").write_bytes(evil)
        ck.write_manifest(dest)
    return dest


@pytest.mark.parametrize("forged_manifest", [False, True], ids=["no-manifest", "forged-manifest"])
def test_planted_pickles_never_run(source, tmp_path, forged_manifest, capsys):
    marker = tmp_path / "code-ran"
    run = tmp_path / "victim"
    planted = _plant(source, run / "checkpoints" / "step_0000002", marker, forged_manifest)
    common = ["train", "tiny", *SMALL, *STEPS, "--no-progress"]
    commands = {
        "resume": [*common, f"run.dir={run}"],
        "init_from": [*common, f"run.dir={tmp_path / 'fresh'}", f"init_from={planted}"],
        "convert": ["convert", str(planted), str(tmp_path / "converted")],
        "sample": ["sample", str(planted), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")],
        "export": ["export", str(planted), str(tmp_path / "exported")],
        "eval": ["eval", str(planted), "--metrics", "adherence", "--num", "1"],
    }
    expected = "could not be read (UnpicklingError: builtins.exec is not allowed" if forged_manifest else \
        "has no manifest.json"
    for what, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (what, err)
        assert not marker.exists(), what


def test_the_cli_reports_an_untrusted_checkpoint_in_one_line(source, tmp_path):
    planted = _plant(source, tmp_path / "step_0000002", tmp_path / "code-ran", forged_manifest=False)
    proc = subprocess.run([sys.executable, "-m", "daybreak", "sample", str(planted), "--prompt", "a red circle",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "code-ran").exists()
