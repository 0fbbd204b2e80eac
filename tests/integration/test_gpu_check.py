"""`scripts/gpu_check.sh`: its usage errors, and one of its steps run for real in --dry-run mode.

The whole dry run (every step, a few minutes) is what a session runs by hand before lending the
script a GPU; here its plumbing runs on the shortest step: the step's PASS line, its log, its
figures and the merged gpu_check.json.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}  # this interpreter, not `uv run`
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    for args, message in ((["--bogus"], "unknown option --bogus"), ([str(tmp_path)], "not an empty folder"),
                          (["a", "b"], "one OUTDIR only")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"  # nothing touched


def test_dry_run_step_passes_and_writes_its_figures(tmp_path):
    out = tmp_path / "check"
    r = run("--dry-run", "--only", "attention", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "attention        PASS" in r.stdout and "1 PASS, 0 FAIL/SKIP" in r.stdout
    figures = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in figures["steps"]] == ["attention"]
    for side in ("512px", "1024px"):  # the kernel the profiler saw for each shape
        assert figures["attention"][side]["backend"] in ("flash", "efficient", "cudnn", "math")
    assert (out / "attention.log").is_file()
