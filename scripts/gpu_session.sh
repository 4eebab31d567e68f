#!/usr/bin/env bash
# One GPU session in one device call: build, check, test, sanitize, benchmark, profile, summarize.
#
#   bash scripts/gpu_session.sh [STAGE ...] [-- PYTEST_ARGS_FOR_BENCH ...]
#
# Stages (in this order, default: all of them while the time budget lasts):
#   setup      pip install --no-build-isolation --no-deps -e . (CUDA extension forced when csrc/ has it)
#   info       python -m convmixer_kernels info
#   tests      the test suite on CUDA (python -m pytest tests)
#   sanitizer  compute-sanitizer memcheck + racecheck on the CUDA-backend tests ($SANITIZER_TESTS)
#   bench      pytest bench/ (PYTEST_ARGS_FOR_BENCH after "--", e.g. -k "not model")
#   profile    convmixer-kernels profile --trace ($PROFILE_ARGS)
#   summary    bench/summarize.py over this run's bench results
#
# A device call may run 10 minutes: every stage runs under `timeout` within BUDGET_S (default 560 s,
# counted from the start), and the results are packed before the budget ends. Split a session
# across calls, e.g.
#   bash scripts/gpu_session.sh setup info tests sanitizer
#   bash scripts/gpu_session.sh setup bench -- -k "not model"
#   bash scripts/gpu_session.sh setup bench summary -- -k model --bench-configs 1536/20-k9-p7
#   bash scripts/gpu_session.sh setup profile
#
# What comes back under $OUT (at most 8 files, one folder deep):
#   stages.txt  bench-*.json  profile.json  profile.png  summary.md  summary.png  logs.tar.gz
# (logs.tar.gz: every stage's log, profile.txt and the torch.profiler trace). Copy the JSON and
# PNG files you keep into bench/results/ and run bench/summarize.py --readme README.md locally.
set -u -o pipefail

START_S=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-runs/gpu_session-$(date -u +%Y%m%dT%H%M%S)}
SANITIZER_TESTS=${SANITIZER_TESTS:-tests/test_blocks.py -k cuda}
PROFILE_ARGS=${PROFILE_ARGS:-}
ALL_STAGES="setup info tests sanitizer bench profile summary"

stages=()
bench_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; bench_args=("$@"); break; fi
  case " $ALL_STAGES all " in
    *" $1 "*) stages+=("$1") ;;
    *) echo "unknown stage '$1'; stages: $ALL_STAGES (or all)" >&2; exit 2 ;;
  esac
  shift
done
if [ ${#stages[@]} -eq 0 ] || [ "${stages[*]}" = "all" ]; then read -r -a stages <<< "$ALL_STAGES"; fi

mkdir -p "$OUT"
RUN=$(mktemp -d)
mkdir -p "$RUN/logs" "$RUN/results" "$RUN/profile"
STATUS="$RUN/stages.txt"
printf '%-10s %6s %8s  %s\n' stage rc seconds note > "$STATUS"

remaining() { echo $(( BUDGET_S - ($(date +%s) - START_S) )); }

# run_stage NAME COMMAND...: under timeout (the budget left, less 25 s for packing), logged
run_stage() {
  local name=$1; shift
  local left=$(( $(remaining) - 25 ))
  if [ "$left" -lt 10 ]; then
    printf '%-10s %6s %8s  %s\n' "$name" - 0 "not run: time budget spent" >> "$STATUS"
    return 0
  fi
  echo "=== $name (up to ${left}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$left" "$@" > "$RUN/logs/$name.log" 2>&1
  rc=$?
  local note=""
  [ $rc -eq 124 ] && note="timed out"
  tail -n 15 "$RUN/logs/$name.log"
  printf '%-10s %6s %8s  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" >> "$STATUS"
  return 0
}

stage_setup() {
  local force=0
  [ -f csrc/build_cuda.py ] && force=1
  [ $force -eq 0 ] && echo "csrc/build_cuda.py is missing: installing without the CUDA extension"
  CONVMIXER_KERNELS_FORCE_BUILD=$force CONVMIXER_KERNELS_CUDA_ARCHS=${CONVMIXER_KERNELS_CUDA_ARCHS:-90} \
    MAX_JOBS=${MAX_JOBS:-12} python -m pip install --no-build-isolation --no-deps -e . &&
  python -c "import convmixer_kernels, torch; print('convmixer_kernels', convmixer_kernels.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}

stage_sanitizer() {
  if ! command -v compute-sanitizer > /dev/null; then echo "compute-sanitizer not found"; return 3; fi
  local rc=0
  for tool in memcheck racecheck; do
    echo "--- compute-sanitizer --tool $tool: pytest $SANITIZER_TESTS"
    # shellcheck disable=SC2086  # SANITIZER_TESTS is a list of pytest arguments
    compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      python -m pytest -q -x -p no:cacheprovider $SANITIZER_TESTS || rc=$?
  done
  return $rc
}

export -f stage_setup stage_sanitizer  # run_stage runs them under `timeout bash -c`
export SANITIZER_TESTS
for stage in "${stages[@]}"; do
  case $stage in
    setup) run_stage setup bash -c stage_setup ;;
    info) run_stage info python -m convmixer_kernels info ;;
    tests) run_stage tests python -m pytest -q -p no:cacheprovider tests ;;
    sanitizer) run_stage sanitizer bash -c stage_sanitizer ;;
    bench) run_stage bench python -m pytest -q -p no:cacheprovider bench/ --bench-out "$RUN/results" \
             "${bench_args[@]}" ;;
    # shellcheck disable=SC2086  # PROFILE_ARGS is a list of arguments
    profile) run_stage profile python -m convmixer_kernels profile --trace --out "$RUN/profile" $PROFILE_ARGS ;;
    summary)
      if ls "$RUN"/results/bench-*.json > /dev/null 2>&1; then
        run_stage summary python bench/summarize.py "$RUN"/results/bench-*.json --out "$RUN/summary.md" \
          --plot "$RUN/summary.png"
      else
        printf '%-10s %6s %8s  %s\n' summary - 0 "no bench results in this run" >> "$STATUS"
      fi ;;
  esac
done

# pack: the few files worth reading directly, everything else in one archive
cp "$RUN"/results/bench-*.json "$OUT"/ 2> /dev/null
for f in profile/profile.json profile/profile.png summary.md summary.png stages.txt; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
done
tar -czf "$OUT/logs.tar.gz" -C "$RUN" logs $(cd "$RUN" && ls profile/profile.txt profile/trace.json 2> /dev/null)
rm -rf "$RUN"

echo
if [ -f "$OUT/summary.md" ]; then
  sed -n '/\*\*Targets\*\*/,/\*\*Details\*\*/p' "$OUT/summary.md" | grep -v '^\*\*Details'
fi
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
cat "$OUT/stages.txt"
