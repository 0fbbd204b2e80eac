#!/usr/bin/env bash
# The one check to run the first time a GPU (one H200) is at hand: about 8 minutes, nothing downloaded.
#
#   bash scripts/gpu_check.sh [--dry-run] [--only STEPS] [OUTDIR]
#
# Steps (each PASS or FAIL, with its log in OUTDIR/<step>.log):
#   bench_tread_on / bench_tread_off  `daybreak bench` of PRX small at 512 px, bf16 + compile, flow loss
#                                     (the frozen teachers need downloads): step, phases, MFU against the
#                                     stated peak, forward+backward-only MFU, peak memory
#   attention                         the kernel SDPA runs at the 512 and 1024 px shapes
#   syncs                             host-device syncs per training step (torch.cuda.set_sync_debug_mode)
#   fsdp                              1-rank NCCL FSDP2 bf16 steps, compile off and on
#   train / resume / sample           30 steps of `daybreak train demo` in bf16 + compile, a resume from its
#                                     checkpoint to step 40, `daybreak sample` of the result
#   bench_fp8_tensorwise / _rowwise   the bench_tread_on step with train.fp8 (torchao float8 on the blocks'
#                                     linear layers): its ms/step and MFU against bench_tread_on's bf16
#                                     (the planner's FP8_EFFICIENCY assumption, bench/plan.py)
# Figures: OUTDIR/gpu_check.json (default $OUT when set, else runs/gpu_check-<time>); OUTDIR must be new
# or empty. --dry-run: the same steps on the CPU at tiny sizes (fp32, compile off), a few minutes.
# --only STEP[,STEP...]: just those steps (a rerun; train must precede resume and sample).
# Exit status: 0 when every step passed, 1 otherwise, 2 for a usage error.
set -u

DRY=0
DIR=""
ONLY=""
while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=",${2:?gpu_check.sh: --only needs STEP[,STEP...]},"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (use --dry-run, --only STEPS, or --help)" >&2; exit 2 ;;
    *) [ -n "$DIR" ] && { echo "gpu_check.sh: one OUTDIR only, got $DIR and $1" >&2; exit 2; }; DIR="$1" ;;
  esac
  shift
done
DIR="${DIR:-${OUT:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}}"
if [ -e "$DIR" ] && { [ ! -d "$DIR" ] || [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; }; then
  echo "gpu_check.sh: $DIR exists and is not an empty folder; give a new OUTDIR" >&2
  exit 2
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=($PYTHON)
elif command -v uv >/dev/null 2>&1; then PY=(uv run --no-sync python)
else PY=(python); fi
DB=("${PY[@]}" -m daybreak)
export PYTHONUNBUFFERED=1

BUDGET=480  # seconds of wall time for all the steps; later steps are skipped past it
SLOW=1      # --dry-run: a CPU, maybe shared, gets 4x the time limits
START=$(date +%s)
: > "$DIR/steps.jsonl"

step() {  # step NAME TIMEOUT_S CMD...: runs CMD, logs to NAME.log, records PASS/FAIL and its seconds
  local name=$1 limit=$(( $2 * SLOW )); shift 2
  local now=$(date +%s) rc
  [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]] && return
  if (( now - START > BUDGET * SLOW )); then
    echo "{\"step\": \"$name\", \"status\": \"SKIP\", \"seconds\": 0, \"reason\": \"past the ${BUDGET} s budget\"}" >> "$DIR/steps.jsonl"
    printf '%-16s SKIP (past the %s s budget)\n' "$name" "$(( BUDGET * SLOW ))"
    return
  fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - now )) status=PASS
  (( rc != 0 )) && status=FAIL
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $took}" >> "$DIR/steps.jsonl"
  printf '%-16s %s (%d s%s)\n' "$name" "$status" "$took" "$( (( rc == 124 )) && echo ", timed out after $limit s")"
  (( rc != 0 )) && tail -n 5 "$DIR/$name.log" | sed 's/^/    /'
}

json_line() {  # json_line LOG OUT: the last line of LOG that is a JSON object, into OUT
  [ -f "$1" ] && { grep '^{' "$1" | tail -n 1 > "$2" || true; }
}

if (( DRY )); then
  echo "gpu_check --dry-run: CPU, tiny sizes, fp32, compile off -> $DIR"
  SLOW=4
  BENCH=(tiny data.image_size=16 train.micro_batch=2 tread.start=1 tread.end=2 train.compile=false --steps 2 --warmup 1)
  FLAG=(--dry-run)
  FP8=(train.fp8_emulate=true)
  DEMO=(model.preset=tiny data.image_size=16 train.global_batch=4 train.micro_batch=4 text.tokenizer_sample=200
        sample.steps=2 "sample.prompts=[a red circle on the left]" train.compile=false train.precision=fp32)
  STEPS=4; CKPT=2; MORE=6; SAMPLE=(--steps 2)
else
  echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1) -> $DIR"
  BENCH=(speedrun-512 repa.enabled=false perceptual.enabled=false train.compile=true train.precision=bf16
         train.fp8=false train.replicate=1 --steps 5 --warmup 3)
  FLAG=()
  FP8=()
  DEMO=(train.compile=true train.precision=bf16)
  STEPS=30; CKPT=15; MORE=40; SAMPLE=()
fi

step bench_tread_on 150 "${DB[@]}" bench "${BENCH[@]}" tread.enabled=true
json_line "$DIR/bench_tread_on.log" "$DIR/bench_tread_on.json"
step bench_tread_off 150 "${DB[@]}" bench "${BENCH[@]}" tread.enabled=false
json_line "$DIR/bench_tread_off.log" "$DIR/bench_tread_off.json"
step attention 60 "${PY[@]}" -m daybreak.bench.gpu_check attention "$DIR/attention.json" "${FLAG[@]}"
step syncs 120 "${PY[@]}" -m daybreak.bench.gpu_check syncs "$DIR/syncs.json" "${FLAG[@]}"
step fsdp 150 "${PY[@]}" -m daybreak.bench.gpu_check fsdp "$DIR/fsdp.json" "${FLAG[@]}"
RUN="$DIR/demo"
step train 150 "${DB[@]}" train demo "run.dir=$RUN" "train.steps=$STEPS" "train.checkpoint_every=$CKPT" \
  train.log_every=5 "${DEMO[@]}" --no-progress
step resume 120 bash -c 'set -o pipefail; "$@" | tee /dev/stderr | grep "resumed from step '"$STEPS"'" > /dev/null' _ \
  "${DB[@]}" train demo "run.dir=$RUN" "train.steps=$MORE" "train.checkpoint_every=$CKPT" train.log_every=5 \
  "${DEMO[@]}" --no-progress --allow-changed train.steps
step sample 60 "${DB[@]}" sample "$RUN/final" --prompt "a red circle on the left" --out "$DIR/sample.png" "${SAMPLE[@]}"
for fp8 in tensorwise rowwise; do
  step "bench_fp8_$fp8" 150 "${DB[@]}" bench "${BENCH[@]}" tread.enabled=true "train.fp8=$fp8" "${FP8[@]}"
  json_line "$DIR/bench_fp8_$fp8.log" "$DIR/bench_fp8_$fp8.json"
done

"${PY[@]}" -m daybreak.bench.gpu_check merge "$DIR" > /dev/null 2>&1 || echo "gpu_check.sh: could not write $DIR/gpu_check.json" >&2
TOTAL=$(( $(date +%s) - START ))
FAILED=$(grep -c '"status": "\(FAIL\|SKIP\)"' "$DIR/steps.jsonl")
echo "summary: $(grep -c '"status": "PASS"' "$DIR/steps.jsonl") PASS, $FAILED FAIL/SKIP in $TOTAL s; figures in $DIR/gpu_check.json"
(( FAILED == 0 ))
