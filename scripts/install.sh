#!/usr/bin/env bash
# Create .venv from uv.lock. On a machine that ships a CPU build of the locked torch (a wheel in
# $DAYBREAK_TORCH_WHEELS, default /opt/wheels), install that instead of the CUDA build and its
# several GB of nvidia-* packages; everywhere else this is a plain `uv sync`.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${DAYBREAK_TORCH_WHEELS:-/opt/wheels}"
torch_version=$(awk '/^name = "torch"$/{getline; gsub(/version = |"/,""); print; exit}' uv.lock)
py_tag=$(uv run --no-project python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
cpu_wheel=$(ls "$wheels"/torch-"$torch_version"+cpu-"$py_tag"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$cpu_wheel" ]; then
  uv sync --frozen --all-extras
  exit 0
fi
echo "install: using the CPU torch wheel $cpu_wheel"
skip=()
for pkg in torch triton $(grep -oE '^name = "(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)"' uv.lock | sed 's/name = //; s/"//g'); do
  skip+=(--no-install-package "$pkg")
done
uv sync --frozen "${skip[@]}"
uv pip install --no-deps "$cpu_wheel"
