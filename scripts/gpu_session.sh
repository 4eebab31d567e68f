#!/usr/bin/env bash
# The 10-minute GPU kit for a lent machine: one H200, Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# nothing installable there; 15 minutes of device time per session (start-up included), 10 minutes
# per command, at most 8 files back.
#
#   bash scripts/gpu_session.sh prebuild        # HERE (no GPU): cp312 wheel of the CUDA extension
#                                               #   against torch 2.11.0+cu130, into .whl/ (carried)
#   bash scripts/gpu_session.sh tier1           # on the GPU, first call (<= TIER1_BUDGET_S)
#   bash scripts/gpu_session.sh tier2           # on the GPU, second call (<= TIER2_BUDGET_S)
#   bash scripts/gpu_session.sh --dry-run tier1 # print what a tier would run, and its budget
#
# tier 1: install the prebuilt wheel (no compile), info, correctness of both blocks and the whole
#   model on CUDA against the reference (tests/test_blocks.py, tests/test_model.py, every backend),
#   headline timings (dw block, pw block, 1536/20 training step vs eager NCHW, eager channels_last,
#   torch.compile; bounded autotuning) and `inspect --json` for predicted vs measured per kernel.
# tier 2: the full pytest bench/, the profile sweep and plot, compute-sanitizer memcheck + racecheck
#   on the CUDA tests.
# Each tier runs its stages under `timeout` within its budget, prints a short table last and packs
# at most 8 files into $OUT.
set -u -o pipefail

TIER1_BUDGET_S=${TIER1_BUDGET_S:-300}
TIER2_BUDGET_S=${TIER2_BUDGET_S:-540}
PACK_S=25
OUT=${OUT:-runs/gpu_session-$(date -u +%Y%m%dT%H%M%S)}
WHEELS=${WHEELS:-.whl}
# PyPI's torch 2.11.0 for Linux is the CUDA 13.0 build, the same ABI as the GPU image's 2.11.0+cu130
TORCH_GPU=${TORCH_GPU:-torch==2.11.0}
PY312=${PY312:-$(command -v python3.12 || echo "$HOME/.pyenv/versions/3.12*/bin/python3.12")}

TIER1_STAGES=(install info correctness timings inspect)
TIER2_STAGES=(install bench profile sanitizer)

stage_cmd() {  # the command line of a stage (what --dry-run prints)
  case $1 in
    install) echo "python -m pip install --no-deps --no-index --find-links $WHEELS convmixer-kernels || CONVMIXER_KERNELS_FORCE_BUILD=0 python -m pip install --no-build-isolation --no-deps -e ." ;;
    info) echo "python -m convmixer_kernels info" ;;
    correctness) echo "python -m pytest -q -x -p no:cacheprovider tests/test_blocks.py tests/test_model.py" ;;
    timings) echo "python -m pytest -q -p no:cacheprovider bench/test_depthwise_block.py bench/test_pointwise_block.py bench/test_model.py --bench-configs 1536/20-k9-p7 --bench-rep-ms 100 --bench-out \$RUN/results -k 'not infer'" ;;
    inspect) echo "python -m convmixer_kernels inspect --backend triton --json \$RUN/static-sm90-measured-run.json" ;;
    bench) echo "python -m pytest -q -p no:cacheprovider bench/ --bench-out \$RUN/results" ;;
    profile) echo "python -m convmixer_kernels profile --trace --out \$RUN/profile" ;;
    sanitizer) echo "compute-sanitizer --tool memcheck --error-exitcode 99 python -m pytest -q -x -p no:cacheprovider tests/test_blocks.py -k cuda && compute-sanitizer --tool racecheck --error-exitcode 99 python -m pytest -q -x -p no:cacheprovider tests/test_blocks.py -k cuda" ;;
  esac
}

prebuild() {  # HERE: a cp312 wheel of the package with the CUDA extension, against the GPU image's torch
  local venv=${PREBUILD_VENV:-/tmp/cmk-prebuild-py312}
  # shellcheck disable=SC2086
  $PY312 -m venv "$venv" && "$venv/bin/pip" install -q "$TORCH_GPU" &&
  "$venv/bin/pip" install -q setuptools wheel ninja numpy &&
  CONVMIXER_KERNELS_FORCE_BUILD=1 CONVMIXER_KERNELS_CUDA_ARCHS=90 MAX_JOBS=2 \
    "$venv/bin/pip" wheel --no-build-isolation --no-deps -w "$WHEELS" . &&
  du -sh "$WHEELS" && echo "carry $WHEELS with the device call (<= 64 MiB)"
}

dry=0
[ "${1:-}" = "--dry-run" ] && { dry=1; shift; }
tier=${1:-}
case $tier in
  prebuild) if [ $dry -eq 1 ]; then echo "prebuild (here, no GPU): $TORCH_GPU for cp312 from PyPI; pip wheel -> $WHEELS"; exit 0; fi
            prebuild; exit $? ;;
  tier1) stages=("${TIER1_STAGES[@]}"); budget=$TIER1_BUDGET_S ;;
  tier2) stages=("${TIER2_STAGES[@]}"); budget=$TIER2_BUDGET_S ;;
  *) echo "usage: $0 [--dry-run] prebuild|tier1|tier2" >&2; exit 2 ;;
esac

if [ $dry -eq 1 ]; then
  echo "$tier budget_s=$budget pack_s=$PACK_S max_files=8"
  for s in "${stages[@]}"; do echo "  $s: $(stage_cmd "$s")"; done
  exit 0
fi

START_S=$(date +%s)
mkdir -p "$OUT"
RUN=$(mktemp -d)
export RUN
mkdir -p "$RUN/logs" "$RUN/results" "$RUN/profile"
STATUS="$RUN/stages.txt"
printf '%-12s %6s %8s  %s\n' stage rc seconds note > "$STATUS"
for s in "${stages[@]}"; do
  left=$(( budget - PACK_S - ($(date +%s) - START_S) ))
  if [ "$left" -lt 10 ]; then printf '%-12s %6s %8s  %s\n' "$s" - 0 "not run: budget spent" >> "$STATUS"; continue; fi
  echo "=== $s (up to ${left}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$left" bash -c "$(stage_cmd "$s")" > "$RUN/logs/$s.log" 2>&1
  rc=$?
  tail -n 8 "$RUN/logs/$s.log"
  printf '%-12s %6s %8s  %s\n' "$s" "$rc" "$(( $(date +%s) - t0 ))" "$([ $rc -eq 124 ] && echo 'timed out')" >> "$STATUS"
done
# pack (<= 8 files): results, the static JSON, summary, stages, logs archive
cp "$RUN"/results/bench-*.json "$OUT"/ 2> /dev/null
for f in static-sm90-measured-run.json profile/profile.json profile/profile.png stages.txt; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
done
ls "$RUN"/results/bench-*.json > /dev/null 2>&1 && python bench/summarize.py "$RUN"/results/bench-*.json --out "$OUT/summary.md" 2> /dev/null
tar -czf "$OUT/logs.tar.gz" -C "$RUN" logs
rm -rf "$RUN"
echo
[ -f "$OUT/summary.md" ] && sed -n '/\*\*Targets\*\*/,/\*\*All workloads/p' "$OUT/summary.md"
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$OUT/stages.txt"
