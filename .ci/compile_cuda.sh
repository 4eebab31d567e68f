#!/usr/bin/env bash
# Compile-check every CUDA kernel source under csrc/ with the machine's nvcc, for sm_80 and sm_90.
#
# sm_90 (the H200 the package is tuned for) is compiled as the extension build compiles it: -O3
# through ptxas. The other architectures go through the same front end and code generation with the
# device optimizer off (-Xcicc -O0 -Xptxas -O0): that still catches every syntax, template,
# instantiation and per-architecture intrinsic error, in a quarter of the time (the optimizer is
# ~90% of a file's compile); only the optimized register allocation is not checked for them.
#
# The kernels never include torch headers, so this needs only nvcc (torch's CPU build lacks the
# CUDA headers the binding needs). It catches syntax, template and instantiation errors on
# machines without a GPU; nothing is run. Exits non-zero on the first failing file.
#   CMK_COMPILE_ARCHS  architectures to compile for (default "80 90")
#   CMK_COMPILE_FULL_ARCHS  those of them compiled with the full optimizer (default "90")
#   CMK_COMPILE_JOBS   parallel nvcc processes (default: the number of cores)
#   NVCC               the compiler (default: nvcc on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
ARCHS=${CMK_COMPILE_ARCHS:-"80 90"}
FULL_ARCHS=${CMK_COMPILE_FULL_ARCHS:-"90"}
JOBS=${CMK_COMPILE_JOBS:-$(nproc)}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "compile_cuda.sh: $NVCC not found" >&2
    exit 2
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

mapfile -t SOURCES < <(find csrc/kernels -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
    echo "compile_cuda.sh: no .cu files under csrc/kernels" >&2
    exit 1
fi
echo "compile_cuda.sh: $("$NVCC" --version | grep -o 'release [0-9.]*'), archs: $ARCHS (optimized: $FULL_ARCHS), $JOBS jobs"

# The flags torch's CUDAExtension adds, so that what compiles here compiles there.
export NVCC OUT FULL_ARCHS
export FLAGS="-std=c++17 -lineinfo -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
compile_one() {
    local src=$1 arch=$2 start=$SECONDS
    local obj="$OUT/$(basename "$src" .cu).sm_$arch.o" opt="-O3" mode="-O3"
    if [[ " $FULL_ARCHS " != *" $arch "* ]]; then
        opt="-Xcicc -O0 -Xptxas -O0" mode="-O0"
    fi
    # shellcheck disable=SC2086
    if "$NVCC" $FLAGS $opt -arch="sm_$arch" -c "$src" -o "$obj" >"$obj.log" 2>&1; then
        echo "ok    sm_$arch  $src ($mode, $((SECONDS - start)) s)"
        [ -s "$obj.log" ] && sed 's/^/      /' "$obj.log"
        return 0
    fi
    echo "FAIL  sm_$arch  $src"
    sed 's/^/      /' "$obj.log"
    return 1
}
export -f compile_one

start=$SECONDS
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        printf '%s %s\n' "$src" "$arch"
    done
done | xargs -P "$JOBS" -n 2 bash -c 'compile_one "$0" "$1"' && status=0 || status=$?
if [ "$status" -ne 0 ]; then
    echo "compile_cuda.sh: FAILED (some files did not compile, see above)" >&2
    exit 1
fi
echo "compile_cuda.sh: compiled ${#SOURCES[@]} files x $(echo $ARCHS | wc -w) archs in $((SECONDS - start)) s"
