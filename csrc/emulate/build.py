"""Build ``csrc/`` as a CPU extension that runs the CUDA kernels in the emulator (tests only).

The binding (csrc/binding.cpp) and every kernel source are compiled with g++ and
``-DCMK_EMULATE``: kernels launch as blocks of std::threads on CPU tensors (see
emulate.h). Only the CUDA headers are needed (for __half and __nv_bfloat16), not a GPU
and not a CUDA build of torch. The result is cached under build/cmk_emulator/.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
REPO = os.path.dirname(CSRC)


def cuda_include_dir() -> Optional[str]:
    """The CUDA toolkit's include directory (cuda_fp16.h), or None when there is none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


def missing_requirement() -> Optional[str]:
    """Why the emulator cannot be built here, or None."""
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_fp16.h) found; set CUDA_HOME"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) found"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    return None


def build(verbose: bool = False):
    """Compile (or reuse) the emulated extension and return the module."""
    from torch.utils.cpp_extension import load

    reason = missing_requirement()
    if reason:
        raise RuntimeError(f"cannot build the CUDA-kernel emulator: {reason}")
    build_dir = os.path.join(REPO, "build", "cmk_emulator")
    os.makedirs(build_dir, exist_ok=True)
    return load(
        name="cmk_emulated",
        sources=[os.path.join(CSRC, "binding.cpp"), os.path.join(HERE, "emulate_kernels.cpp")],
        extra_include_paths=[CSRC, cuda_include_dir()],
        extra_cflags=["-DCMK_EMULATE", "-std=c++20", "-O1", "-pthread", "-Wno-unused-function"],
        extra_ldflags=["-pthread"],
        build_directory=build_dir,
        verbose=verbose,
    )
