"""The built wheel carries the bundled configs: installed outside the checkout, `daybreak train tiny` runs."""

import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv builds the wheel")
def test_installed_wheel_trains_a_bundled_config(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(["uv", "build", "--wheel", "--out-dir", str(dist), str(ROOT)], check=True, capture_output=True)
    (wheel,) = dist.glob("daybreak-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies come from this environment (a path entry, so its editable daybreak is not seen)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(["uv", "pip", "install", "--python", str(python), "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import daybreak; print(daybreak.__file__)"], cwd=work, check=True,
                           capture_output=True, text=True).stdout
    assert where.startswith(str(site))
    run = subprocess.run([str(env_dir / "bin" / "daybreak"), "train", "tiny", "train.steps=2", "run.dir=out",
                          "train.log_every=1", "--no-progress"], cwd=work, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (work / "out" / "final" / "transformer_ema.safetensors").is_file()
