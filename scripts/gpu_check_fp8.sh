#!/usr/bin/env bash
# FP8 matmuls on one GPU (issue 27; fold into scripts/gpu_check.sh as one more step): `daybreak bench` of
# PRX small at 512 px, bf16 autocast, torch.compile, no frozen networks (nothing to download), with
# train.fp8 off, tensorwise and rowwise. Prints ms/step, MFU against the bf16 dense peak and the speed-up
# each FP8 recipe buys over bf16 (the planner assumes 1.31x tensorwise / 1.13x rowwise on the converted
# layers, about 1.2x / 1.1x on a step: FP8_EFFICIENCY in bench/plan.py), PASS / FAIL per run, and writes
# every figure to fp8.json in $OUT (or the folder given).
#   bash scripts/gpu_check_fp8.sh [--dry-run] [OUT_DIR]
# --dry-run: the tiny model on the CPU in torchao's emulation mode: checks the script, not the speed.
# Pass the fp8-off MFU to `daybreak plan --mfu`: the planner adds FP8's speed-up on top of it.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-${OUT:-runs/gpu_check_fp8}}"
mkdir -p "$out"
if [ "$dry" = 1 ]; then
  config=tiny; common=(data.image_size=16 train.global_batch=4 train.micro_batch=4 train.fp8_emulate=true); steps=(--steps 2 --warmup 1)
else
  config=speedrun-512
  common=(repa.enabled=false perceptual.enabled=false train.global_batch=32 train.micro_batch=32 train.replicate=1
          train.precision=bf16 train.compile=true)
  steps=(--steps 10 --warmup 3)
fi
fail=0
for fp8 in false tensorwise rowwise; do
  if timeout 240 uv run --no-sync daybreak bench "$config" "${common[@]}" "train.fp8=$fp8" "${steps[@]}" \
       > "$out/bench-fp8-$fp8.json" 2> "$out/bench-fp8-$fp8.log"; then
    echo "PASS  bench train.fp8=$fp8"
  else
    echo "FAIL  bench train.fp8=$fp8 (see $out/bench-fp8-$fp8.log)"; fail=1
  fi
done
uv run --no-sync python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for fp8 in ("false", "tensorwise", "rowwise"):
    f = out / f"bench-fp8-{fp8}.json"
    lines = f.read_text().splitlines() if f.is_file() else []
    if lines:
        runs[fp8] = json.loads(lines[-1])
base = runs.get("false")
summary = {}
for fp8, r in runs.items():
    summary[fp8] = {k: r.get(k) for k in ("ms_per_step", "images_per_s", "mfu", "peak_memory_gib", "peak_flops")}
    summary[fp8]["speedup_over_bf16"] = base["ms_per_step"] / r["ms_per_step"] if base else None
    print(f"train.fp8={fp8:<10} {r['ms_per_step']:8.1f} ms/step  MFU {100 * r['mfu']:5.1f} % (of the bf16 peak)"
          + (f"  {summary[fp8]['speedup_over_bf16']:.2f}x bf16" if base else ""))
(out / "fp8.json").write_text(json.dumps(summary, indent=1))
print(f"figures: {out / 'fp8.json'}")
PY
exit $fail
