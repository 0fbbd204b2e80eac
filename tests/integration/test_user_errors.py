"""Every user mistake is one line on stderr and exit 2, never a traceback, and no command deletes or
overwrites what it did not create: each bad input below is run through `daybreak.cli.main` as typed,
and for the destructive ones the target's files are checked to be all still there, unchanged."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SMALL

from daybreak.cli import main
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.io import checkpoint as ck


@pytest.fixture(scope="module")
def run(finished_run):
    """A finished 2-step tiny run (16 px) with step checkpoints 1 and 2 (the session's, left as it is)."""
    return finished_run


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself) with its bytes."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def one_line(capsys, args: list[str], needle: str) -> str:
    """Run `daybreak ARGS`: exit 2 and exactly one stderr line holding `needle`."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # no bars
    err = "\n".join(lines)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.fixture
def user_files(tmp_path):
    """A file, and a folder of a user's own files, to point outputs at."""
    (tmp_path / "afile").write_text("mine")
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "x.png").write_bytes(b"not a png")
    return tmp_path / "afile", folder


# -------------------------------------------------------------------------- config values


TRAIN = ["train", "tiny", *SMALL]


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=-1", "config key 'optim.lr' must be > 0, got -1.0"),
    ("optim.lr=0", "config key 'optim.lr' must be > 0"),
    ("train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
    ("optim.warmup_steps=-5", "config key 'optim.warmup_steps' must be >= 0, got -5"),
    ("train.sample_every=-1", "config key 'train.sample_every' must be >= 0, got -1"),
    ("ema.every=0", "config key 'ema.every' must be >= 1, got 0"),
    ("ema.decay=1.5", "config key 'ema.decay' must be in [0, 1], got 1.5"),
    ("objective.caption_dropout=1", "config key 'objective.caption_dropout' must be in [0, 1)"),
    ("train.global_batch=0", "config key 'train.global_batch' must be >= 1"),
    ("train.steps=1.5", "config key 'train.steps' must be an integer"),
    ("no.such.key=1", "unknown config key 'no.such.key'"),
    ("optim.lrr=1e-3", "unknown config key 'optim.lrr'; did you mean optim.lr"),
    ("optim.lr.x=1", "config key 'optim.lr' is a value, not a section"),
    ("tread.fraction=1.5", "config key 'tread.fraction' must be in [0, 1)"),
    ("repa.weight=-1", "config key 'repa.weight' must be >= 0"),
    ("train.device=cuda:7", "config key 'train.device'=cuda:7: this machine has"),
    ("train.device=gpu", "config key 'train.device': 'gpu' is not a device"),
])
def test_bad_config_value_is_one_line(capsys, tmp_path, override, needle):
    extra = ["tread.enabled=true"] if override.startswith("tread") else []
    extra += ["repa.enabled=true"] if override.startswith("repa") else []
    one_line(capsys, [*TRAIN, f"run.dir={tmp_path / 'r'}", *extra, override], needle)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_run_dir_naming_a_file(capsys, user_files):
    afile, _ = user_files
    one_line(capsys, [*TRAIN, f"run.dir={afile}"], f"run.dir '{afile}' is a file")
    assert afile.read_text() == "mine"


def test_demo_out_naming_a_file(capsys, user_files):
    afile, _ = user_files
    one_line(capsys, ["demo", "--out", afile, "train.steps=1"], "is a file")
    assert afile.read_text() == "mine"


def test_run_dir_holding_other_files_is_refused(capsys, user_files):
    _, folder = user_files
    before = snapshot(folder)
    one_line(capsys, [*TRAIN, f"run.dir={folder}"], "holds no daybreak run")
    assert snapshot(folder) == before


# -------------------------------------------------------------------------- a run directory of another config


def test_changed_config_is_refused_listing_keys_and_nothing_changes(capsys, run):
    before = snapshot(run)
    err = one_line(capsys, [*TRAIN, f"run.dir={run}", "train.steps=3", "train.checkpoint_every=1",
                            "tread.enabled=true"], "holds a run with a different config")
    assert "train.steps: 2 -> 3" in err and "tread.enabled: False -> True" in err
    assert "--allow-changed train.steps,tread.enabled" in err
    assert snapshot(run) == before  # config.yaml still describes final/


def test_same_config_is_already_complete(capsys, run):
    before = snapshot(run / "final")
    assert main([*TRAIN, f"run.dir={run}", "train.steps=2", "train.checkpoint_every=1", "--no-progress"]) == 0
    assert "run already complete at step 2" in capsys.readouterr().out
    assert snapshot(run / "final") == before


def test_allow_changed_continues_deliberately(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TRAIN, f"run.dir={run}", "train.checkpoint_every=1", "--no-progress"]
    assert main([*args, "train.steps=1"]) == 0
    assert main([*args, "train.steps=2", "--allow-changed", "optim"]) == 2  # not the key that changed
    assert main([*args, "train.steps=2", "--allow-changed", "train.steps"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    assert load_config(run / "config.yaml").train.steps == 2 and ck.checkpoint_step(run / "final") == 2


# -------------------------------------------------------------------------- sample


def sample(run, *extra):
    return ["sample", run / "final", "--prompt", "a red circle on the left", "--steps", "2", *extra]


def test_sample_out_without_extension(capsys, run, tmp_path):
    one_line(capsys, sample(run, "--out", tmp_path / "x"), "needs an image extension")
    assert not (tmp_path / "x").exists()


def test_sample_batch_zero(capsys, run, tmp_path):
    one_line(capsys, sample(run, "--out", tmp_path / "x.png", "--batch", "0"), "--batch: must be >= 1, got 0")


def test_sample_steps_zero(capsys, run, tmp_path):
    one_line(capsys, sample(run, "--out", tmp_path / "x.png", "--steps", "0"), "--steps: must be >= 1, got 0")


def test_sample_parent_is_a_file(capsys, run, user_files):
    afile, _ = user_files
    one_line(capsys, sample(run, "--out", afile / "x.png"), f"'{afile}' is a file, not a directory")
    assert afile.read_text() == "mine"


def test_sample_several_prompts_into_one_file(capsys, run, tmp_path):
    one_line(capsys, sample(run, "--prompt", "a blue square on the top", "--out", tmp_path / "x.png"),
             "names one file, but there are 2 prompts")
    assert not (tmp_path / "x.png").exists()  # no directory named x.png


def test_sample_refuses_an_existing_file_unless_force(capsys, run, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"mine")
    one_line(capsys, sample(run, "--out", out), "exists; choose another or add --force")
    assert out.read_bytes() == b"mine"
    assert main([str(a) for a in sample(run, "--out", out, "--force")]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_sample_refuses_a_non_empty_directory(capsys, run, user_files):
    _, folder = user_files
    before = snapshot(folder)
    one_line(capsys, sample(run, "--out", f"{folder}/"), "exists and is not empty")
    assert snapshot(folder) == before


def test_full_disk_is_one_line_naming_the_path(capsys, run, tmp_path, monkeypatch):
    import daybreak.images

    def full(image, path, settings):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(daybreak.images, "save_png", full)
    one_line(capsys, sample(run, "--out", tmp_path / "x.png"), f"No space left on device: '{tmp_path / 'x.png'}'")


def test_a_real_bug_keeps_its_traceback(run, tmp_path, monkeypatch):
    import daybreak.images

    def bug(image, path, settings):
        raise OSError(errno.EBADF, "bad file descriptor")  # no path: a bug, not the user's mistake

    monkeypatch.setattr(daybreak.images, "save_png", bug)
    with pytest.raises(OSError):
        main([str(a) for a in sample(run, "--out", tmp_path / "x.png")])


# -------------------------------------------------------------------------- eval, bench, convert, data, ablate


def test_eval_num_zero(capsys, run):
    one_line(capsys, ["eval", run / "final", "--num", "0"], "--num: must be >= 1, got 0")


def test_eval_refuses_an_existing_json(capsys, run, tmp_path):
    out = tmp_path / "e.json"
    out.write_text("{}")
    one_line(capsys, ["eval", run / "final", "--num", "1", "--steps", "1", "--out", out], "add --force")
    assert out.read_text() == "{}"


def test_bench_steps_zero(capsys):
    one_line(capsys, ["bench", "tiny", "--steps", "0"], "--steps: must be >= 1, got 0")


def test_convert_refuses_a_non_empty_out_and_force_replaces_it(capsys, run, user_files):
    _, folder = user_files
    before = snapshot(folder)
    step = run / "checkpoints" / "step_0000002"
    one_line(capsys, ["convert", step, folder], "exists and is not empty")
    assert snapshot(folder) == before
    one_line(capsys, ["convert", step, run / "checkpoints" / "step_0000001"], "exists and is not empty")
    assert main(["convert", str(step), str(folder), "--force"]) == 0
    assert ck.checkpoint_step(folder) == 2 and not (folder / "notes.txt").exists()


def test_publish_never_replaces_a_folder_it_did_not_write(user_files, tmp_path):
    _, folder = user_files
    before = snapshot(folder)
    with pytest.raises(UserError, match="not a daybreak checkpoint"):
        ck.write_checkpoint(folder, {"config.yaml": "seed: 0\n"}, {"step": 0})
    assert snapshot(folder) == before and not list(tmp_path.glob(".tmp-*"))


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text("a red square")
    return src


def test_data_convert_into_a_file(capsys, images, user_files):
    afile, _ = user_files
    one_line(capsys, ["data", "convert", images, afile], f"output '{afile}' is a file")
    assert afile.read_text() == "mine"


def test_data_convert_refuses_a_non_empty_out(capsys, images, user_files):
    _, folder = user_files
    before = snapshot(folder)
    one_line(capsys, ["data", "convert", images, folder], "exists and is not empty")
    assert snapshot(folder) == before
    assert main(["data", "convert", str(images), str(folder), "--force"]) == 0
    assert snapshot(folder).items() >= before.items() and list(folder.glob("shard-*.tar"))


def test_ablate_invalid_yaml(capsys, tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: x\nconfig: [tiny\n")
    one_line(capsys, ["ablate", study], "invalid YAML")


def test_export_refuses_a_non_empty_out(capsys, run, user_files):
    _, folder = user_files
    before = snapshot(folder)
    one_line(capsys, ["export", run / "final", folder], "is not empty")
    assert snapshot(folder) == before


# -------------------------------------------------------------------------- torchrun


def test_torchrun_mistake_is_said_once_and_every_rank_exits(tmp_path):
    """2 gloo ranks meet the same bad value: rank 0 says it once, both exit non-zero, nothing hangs."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "daybreak",
                        "train", "tiny", "optim.lr=-1", f"run.dir={tmp_path / 'r'}"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.count("daybreak: error:") == 1, r.stderr[-3000:]
    assert "daybreak: error: config key 'optim.lr' must be > 0, got -1.0" in r.stderr
    assert "exitcode  : 2" in r.stderr  # rank 0's own exit; torchrun then stops rank 1
    assert "daybreak/" not in "".join(line for line in r.stderr.splitlines() if line.strip().startswith("File "))


# -------------------------------------------------------------------------- the fault table
#
# One row per fault: the command as typed (placeholders: {run} a finished run, {final} its final/,
# {w} a folder of the user's own odd files, made once; {tmp} a fresh folder), its exit code, the
# stderr line it must say (the only line, for a refusal), and what stdout must hold (a counted skip).
# Every row also checks that no file in {w} or {run} changed and that nothing was written into {tmp}
# by a refusal. A new case is one line. docs/reliability.md counts these rows by class.

FaultCase = tuple[str, str, list, int, str, str]  # (class, id, argv, exit code, stderr line holds, stdout holds)

SAMPLE = ["sample", "{final}", "--prompt", "a red circle on the left", "--steps", "1", "--out", "{tmp}/x.png"]
EVAL = ["eval", "{final}", "--num", "2", "--steps", "1", "--out", "{tmp}/e.json"]
FAULTS: list[FaultCase] = [
    ("CLI value", "sample --cfg nan", [*SAMPLE, "--cfg", "nan"], 2, "--cfg: must be a finite number, got nan", ""),
    ("CLI value", "sample --cfg inf", [*SAMPLE, "--cfg", "inf"], 2, "--cfg: must be a finite number, got inf", ""),
    ("CLI value", "sample --cfg below sample.cfg's range", [*SAMPLE, "--cfg", "-1"], 2,
     "--cfg: must be >= 0, got -1.0 (as sample.cfg)", ""),
    ("CLI value", "sample --seed overflowing torch", [*SAMPLE, "--seed", "99999999999"], 2,
     "--seed: must be a seed in [0, 4294967295]", ""),
    ("CLI value", "sample --seed negative", [*SAMPLE, "--seed", "-1"], 2, "--seed: must be >= 0, got -1", ""),
    ("CLI value", "sample --size off the patch grid", [*SAMPLE, "--size", "15", "16"], 2, "positive multiples of", ""),
    ("CLI value", "eval --cfg nan", [*EVAL, "--cfg", "nan"], 2, "--cfg: must be a finite number", ""),
    ("CLI value", "eval --seed 2**40", [*EVAL, "--seed", str(2**40)], 2, "--seed: must be a seed in", ""),
    ("CLI value", "data bench --seconds -1", ["data", "bench", "shapes", "--seconds", "-1"], 2,
     "--seconds: must be > 0, got -1", ""),
    ("CLI value", "data bench --resolution 0", ["data", "bench", "shapes", "--resolution", "0"], 2,
     "--resolution: must be >= 1, got 0", ""),
    ("CLI value", "data inspect --limit 0", ["data", "inspect", "{w}/imgs", "--limit", "0"], 2,
     "--limit: must be >= 1, got 0", ""),
    ("CLI value", "plan --price nan", ["plan", "tiny", "--gpus", "1", "--price", "nan"], 2, "--price: must be a finite", ""),
    ("CLI value", "plan --mfu 0", ["plan", "tiny", "--gpus", "1", "--mfu", "0"], 2, "--mfu: must be in (0, 1], got 0", ""),
    ("CLI value", "demo --minutes nan", ["demo", "--minutes", "nan", "--out", "{tmp}/demo"], 2,
     "--minutes: must be a finite number", ""),
    ("CLI value", "ablate --seeds 0", ["ablate", "{w}/none.yaml", "--seeds", "0"], 2, "--seeds: must be >= 1, got 0", ""),
    ("CLI value", "sample --steps past int64", [*SAMPLE, "--steps", "99999999999999999999999"], 2,
     "--steps: must be at most 2**63 - 1", ""),
    ("CLI value", "a prompt longer than the text tower's tokens", [*SAMPLE[:2], "--prompt", "a red circle " * 12,
     *SAMPLE[4:]], 0, "kept the first 16 tokens of each", ""),
    ("config value", "seed overflowing torch", ["config", "tiny", "seed=99999999999"], 2,
     "config key 'seed' must be a seed in [0, 4294967295]", ""),
    ("config value", "seed negative", ["config", "tiny", "seed=-1"], 2, "config key 'seed' must be a seed in", ""),
    ("config value", "sample.seed too large", ["config", "tiny", "sample.seed=4294967296"], 2, "'sample.seed' must be a seed", ""),
    ("config value", "optim.lr=.inf", ["config", "tiny", "optim.lr=.inf"], 2,
     "config key 'optim.lr' must be a finite number, got inf", ""),
    ("config value", "optim.lr=1e999", ["config", "tiny", "optim.lr=1e999"], 2, "'optim.lr' must be a finite number", ""),
    ("config value", "an unranged float key =.nan", ["config", "tiny", "objective.logit_mean=.nan"], 2,
     "'objective.logit_mean' must be a finite number, got nan", ""),
    ("config value", "sample.self_scale=.inf", ["config", "tiny", "sample.self_scale=.inf"], 2, "must be a finite", ""),
    ("config value", "a mapping's float =.nan", ["config", "tiny", "data.captions={a: .nan}"], 2,
     "'data.captions.a' must be a finite number", ""),
    ("config value", "a list's float =.nan", ["config", "tiny", "optim.betas=[.nan, 0.9]"], 2,
     "'optim.betas[0]' must be a finite number", ""),
    ("config value", "an integer key =.inf", ["config", "tiny", "train.steps=.inf"], 2, "'train.steps' must be an integer", ""),
    ("config value", "an integer key past int64", ["config", "tiny", "train.global_batch=99999999999999999999"], 2,
     "'train.global_batch' must be an integer of at most 2**63 - 1", ""),
    ("config value", "a float key =.nan in a file", ["config", "{w}/nan.yaml"], 2, "'ema.decay' must be a finite number", ""),
    ("config file", "config not UTF-8", ["config", "{w}/latin1.yaml"], 2, "latin1.yaml: not UTF-8 text (byte 27", ""),
    ("config file", "binary config to train", ["train", "{w}/binary.yaml"], 2, "binary.yaml: not UTF-8 text", ""),
    ("config file", "--diff OTHER not UTF-8", ["config", "tiny", "--diff", "{w}/latin1.yaml"], 2, "not UTF-8 text", ""),
    ("config file", "plan of a config not UTF-8", ["plan", "{w}/latin1.yaml", "--gpus", "1"], 2, "not UTF-8 text", ""),
    ("config file", "base: chain that loops", ["config", "{w}/loop_a.yaml"], 2, "loop_b.yaml: its base: chain loops", ""),
    ("config file", "base: itself", ["config", "{w}/self.yaml"], 2, "self.yaml: its base: chain loops", ""),
    ("config file", "base: not a name", ["config", "{w}/base_number.yaml"], 2, "base: must be a config path", ""),
    ("config file", "prompts file not UTF-8", [*SAMPLE[:2], "--prompts-file", "{w}/latin1.txt", *SAMPLE[4:]], 2,
     "latin1.txt' is not UTF-8 text", ""),
    ("study file", "a study whose variants are not a list", ["ablate", "{w}/variants_number.yaml", "--print"], 2,
     "'variants' must be a list of variants", ""),
    ("study file", "a study's damaged result.json", ["report", "{w}/study_dir"], 2,
     "base/result.json is not a result (not valid JSON", ""),
    ("data file", "MDS index.json truncated (train)", ["train", "tiny", "run.dir={tmp}/r", "data.source=mds",
     "data.path={w}/mds_truncated"], 2, "mds_truncated/index.json: not an MDS index (JSONDecodeError", ""),
    ("data file", "MDS index.json not UTF-8 (inspect)", ["data", "inspect", "{w}/mds_binary", "--source", "mds",
     "--out", "{tmp}/i"], 2, "mds_binary/index.json: not an MDS index (UnicodeDecodeError", ""),
    ("data file", "MDS index.json without shards (eval --data)", [*EVAL, "--metrics", "fd_tiny", "--data", "mds:{w}/mds_noshards"], 2,
     "mds_noshards/index.json: not an MDS index (KeyError", ""),
    ("data file", "a .tar shard that is not a tar", ["data", "inspect", "{w}/wds", "--source", "webdataset", "--out",
     "{tmp}/i"], 2, "shard-000000.tar: not a readable tar", ""),
    ("data file", "an image file that is not an image (skipped, counted)", ["data", "convert", "{w}/imgs",
     "{tmp}/shards"], 0, "", '"written": 2'),
    ("checkpoint file", "safetensors that are not, listed in a manifest (init_from)", ["train", "tiny",
     "run.dir={tmp}/r", "init_from={w}/listed_garbage_ckpt"], 2,
     "transformer.safetensors' is not a readable safetensors file", ""),
    ("checkpoint file", "a checkpoint with no weights is never converted", ["convert", "{w}/weightless_ckpt",
     "{tmp}/c"], 2, "holds no transformer weights; nothing written", ""),
    ("checkpoint file", "init_from a folder without a manifest", ["train", "tiny", "run.dir={tmp}/r",
     "init_from={w}/garbage_ckpt"], 2, "has no manifest.json", ""),
    ("run directory", "sample of an unfinished run", [*SAMPLE[:1], "{w}/unfinished", *SAMPLE[2:]], 2,
     "is a run directory with no final/ checkpoint yet (the run has not finished); its newest step checkpoint "
     "is {w}/unfinished/checkpoints/step_0000001", ""),
    ("run directory", "export of an unfinished run", ["export", "{w}/unfinished", "{tmp}/x"], 2,
     "no final/ checkpoint yet", ""),
    ("run directory", "eval of an unfinished run", ["eval", "{w}/unfinished", "--num", "2"], 2, "no final/ checkpoint yet", ""),
    ("run directory", "convert of a run directory: its final/", ["convert", "{run}", "{tmp}/c"], 2,
     "final' is already a consolidated checkpoint", ""),
    ("run directory", "sample of a finished run directory: its final/", [*SAMPLE[:1], "{run}", *SAMPLE[2:]], 0, "", "wrote"),
    ("output", "data inspect over a user's inspect.json", ["data", "inspect", "{w}/imgs", "--out", "{w}/inspected"], 2,
     "inspect.json' exists; choose another or add --force", ""),
    ("output", "report --out over a user's file", ["report", "{w}/imgs", "--out", "{w}/notes.md"], 2,
     "notes.md' exists; choose another or add --force", ""),
    ("output", "export under a file", ["export", "{final}", "{w}/notes.md/x"], 2, "notes.md' is a file, not a directory", ""),
    ("output", "ablate into a folder of the user's files", ["ablate", "{w}/study.yaml"], 2,
     "inspected' is not empty and holds no study (no study.yaml)", ""),
]


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, run):
    """The user's odd files the table points at (made once; every row checks they are left as they are)."""
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp
    from PIL import Image

    w = tmp_path_factory.mktemp("odd")
    (w / "latin1.yaml").write_bytes("base: tiny\nrun:\n  name: caf\xe9\n".encode("latin-1"))
    (w / "binary.yaml").write_bytes(b"\x00\x01\xff\xfe")
    (w / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (w / "nan.yaml").write_text("base: tiny\nema:\n  decay: .nan\n")
    (w / "loop_a.yaml").write_text("base: loop_b.yaml\n")
    (w / "loop_b.yaml").write_text("base: loop_a.yaml\n")
    (w / "self.yaml").write_text("base: self.yaml\n")
    (w / "base_number.yaml").write_text("base: 3\n")
    (w / "notes.md").write_text("mine")
    (w / "variants_number.yaml").write_text("name: s\nconfig: tiny\nout: out\nvariants: 5\n")
    (w / "study_dir" / "base").mkdir(parents=True)
    (w / "study_dir" / "study.yaml").write_text("name: s\nconfig: tiny\nout: out\nvariants:\n  - name: base\n")
    (w / "study_dir" / "base" / "result.json").write_text("{broken")
    (w / "study.yaml").write_text(f"name: s\nconfig: tiny\nout: {w / 'inspected'}\nvariants:\n  - name: base\n")
    for name, index in (("mds_truncated", b'{"shards": ['), ("mds_binary", b"\xff\xfe\x00"), ("mds_noshards", b"{}")):
        (w / name).mkdir()
        (w / name / "index.json").write_bytes(index)
    (w / "wds").mkdir()
    (w / "wds" / "shard-000000.tar").write_bytes(b"not a tar" * 100)
    (w / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(w / "imgs" / f"{i}.png")
        (w / "imgs" / f"{i}.txt").write_text("a red square")
    (w / "imgs" / "2.png").write_bytes(b"not a png")
    (w / "imgs" / "2.txt").write_text("a broken square")
    (w / "inspected").mkdir()
    (w / "inspected" / "inspect.json").write_text("{}")
    for name in ("garbage_ckpt", "listed_garbage_ckpt", "weightless_ckpt"):
        (w / name).mkdir()
        (w / name / "config.yaml").write_text((run / "config.yaml").read_text())
    for name in ("garbage_ckpt", "listed_garbage_ckpt"):
        (w / name / "transformer.safetensors").write_bytes(b"garbage" * 10)
    # a sharded checkpoint that verifies and holds recipe tensors only
    with ck._single_process_ok():
        dcp.save({"model.recipe.x": torch.zeros(2)}, checkpoint_id=str(w / "weightless_ckpt"), no_dist=True)
    for name in ("listed_garbage_ckpt", "weightless_ckpt"):
        ck.write_manifest(w / name)
    (w / "unfinished").mkdir()
    shutil.copy(run / "config.yaml", w / "unfinished" / "config.yaml")
    shutil.copytree(run / "checkpoints" / "step_0000001", w / "unfinished" / "checkpoints" / "step_0000001")
    return w


def stat_tree(root: Path) -> dict[str, tuple]:
    """Every file under `root` with its size, modification time and mode: what a write would change."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in sorted(Path(root).rglob("*"))}


@pytest.mark.parametrize("case", FAULTS, ids=[f"{c[0]}: {c[1]}" for c in FAULTS])
def test_fault_table(case, capsys, run, odd_files, tmp_path):
    _, _, argv, code, err_holds, out_holds = case
    fill = dict(run=run, final=run / "final", w=odd_files, tmp=tmp_path)

    def place(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(f"{{{key}}}", str(value))
        return text

    args = [place(a) for a in argv]
    before = stat_tree(odd_files), stat_tree(run)
    capsys.readouterr()
    assert main(args) == code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    assert "Traceback" not in err, err
    if code:
        assert len(lines) == 1 and place(err_holds) in lines[0], err
        if argv[0] != "train":  # (a refused run may leave its new run directory, holding its lock file)
            assert not list(tmp_path.iterdir())  # a refusal writes nothing
    else:
        assert place(err_holds) in err and out_holds in out, (out, err)
    assert (stat_tree(odd_files), stat_tree(run)) == before


def test_reliability_page_counts_the_fault_table():
    """docs/reliability.md's fault table has one row per class with its number of cases, as tested here."""
    import re
    from collections import Counter

    from test_kill_anywhere import PROCESS_CASES

    counts = Counter(c[0] for c in FAULTS) + Counter(c[0] for c in PROCESS_CASES)
    section = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    rows = {name: int(n) for name, n in re.findall(r"^\| ([a-zA-Z -]+?) \| (\d+) \|", section, re.M)}
    assert rows == dict(counts)
    assert f"{sum(counts.values())} cases" in section
