"""The optional CUDA extension ``convmixer_kernels._C``: build switches and the CUDAExtension.

setup.py calls ``cuda_extension_build(force)``, which returns ``(ext_modules, cmdclass)``.
The extension is built only when asked (``CONVMIXER_KERNELS_FORCE_BUILD=1``) or when torch
with CUDA and nvcc are both present; otherwise ``([], {})`` and the package installs with its
Triton and torch paths. Switches (environment variables):

  CONVMIXER_KERNELS_FORCE_BUILD=1      build it; fail loudly, naming what is missing
  CONVMIXER_KERNELS_SKIP_CUDA_BUILD=1  never build it (FORCE wins over SKIP)
  CONVMIXER_KERNELS_CUDA_ARCHS="80;90" SM architectures (";", "," or space separated; "90a" ok)
  MAX_JOBS=N                            parallel compile jobs (read by torch's BuildExtension)

What the extension is built against (torch, its CUDA, nvcc, architectures) is written to a
generated header (build/cmk_generated/cmk_build_info.h) and compiled in;
``convmixer_kernels._cuda_ext`` checks it at import and refuses a mismatched build.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXT_NAME = "convmixer_kernels._C"
BUILD_COMMAND = "CONVMIXER_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e ."
DEFAULT_ARCHS = "80;90"
ENV_FORCE = "CONVMIXER_KERNELS_FORCE_BUILD"
ENV_SKIP = "CONVMIXER_KERNELS_SKIP_CUDA_BUILD"
ENV_ARCHS = "CONVMIXER_KERNELS_CUDA_ARCHS"
GENERATED_DIR = os.path.join(REPO, "build", "cmk_generated")


class CudaBuildError(RuntimeError):
    """The CUDA extension was requested (FORCE) but cannot be built; the message says why."""


def _log(msg: str) -> None:
    print(f"convmixer-kernels: {msg}", file=sys.stderr)


def flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_archs(text: str) -> List[str]:
    """'80;90' / '8.0 9.0' / 'sm_80,sm_90a' -> ['80', '90'] / ['80', '90a']."""
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d)\.?(\d)(a?)", item)
        if not m:
            raise CudaBuildError(f"{ENV_ARCHS}={text!r}: cannot read {item!r}; give SM versions like '80;90'")
        arch = m.group(1) + m.group(2) + m.group(3)
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise CudaBuildError(f"{ENV_ARCHS}={text!r} names no architecture; give SM versions like '80;90'")
    return archs


def ptx_arch(archs: List[str]) -> str:
    """The newest architecture, without an arch-specific 'a' suffix (its PTX must be portable)."""
    return str(max(int(a.rstrip("a")) for a in archs))


def gencode_flags(archs: List[str]) -> List[str]:
    """SASS for each architecture, plus PTX of the newest so that later GPUs can JIT it."""
    ptx = ptx_arch(archs)
    sass = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return sass + [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]


def find_cuda_home(env: Mapping[str, str]) -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc's (symlinks resolved)."""
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def torch_cuda_version() -> Tuple[Optional[str], Optional[str]]:
    """(torch version, torch's CUDA version or None); (None, None) when torch is not importable."""
    try:
        import torch
    except Exception:  # not installed, or broken
        return None, None
    return torch.__version__, torch.version.cuda


def kernel_sources() -> List[str]:
    """Every kernel translation unit (csrc/kernels/*.cu), sorted."""
    kdir = os.path.join(HERE, "kernels")
    return sorted(os.path.join(kdir, f) for f in os.listdir(kdir) if f.endswith(".cu"))


def why_not_buildable(env: Mapping[str, str]) -> Optional[str]:
    """None when torch with CUDA and nvcc are present, else what is missing (with the fix)."""
    torch_version, cuda = torch_cuda_version()
    if torch_version is None:
        return "torch is not importable; install torch first, then build with --no-build-isolation"
    if cuda is None:
        return f"torch {torch_version} is a CPU build (torch.version.cuda is None); install a CUDA build of torch"
    if find_cuda_home(env) is None:
        return "nvcc (the CUDA toolkit) was not found; install it or set CUDA_HOME"
    return None


def build_info(env: Mapping[str, str], archs: List[str], cuda_home: str) -> Dict[str, str]:
    torch_version, cuda = torch_cuda_version()
    return {"torch": torch_version, "cuda": cuda, "archs": ";".join(archs), "ptx": ptx_arch(archs),
            "nvcc": nvcc_version(cuda_home)}


def write_build_info_header(info: Dict[str, str], directory: Optional[str] = None) -> str:
    directory = directory or GENERATED_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "cmk_build_info.h")
    lines = ["// Generated by csrc/build_cuda.py: what convmixer_kernels._C was built against.", "#pragma once"]
    for key, macro in (("torch", "CMK_BUILD_TORCH"), ("cuda", "CMK_BUILD_CUDA"), ("archs", "CMK_BUILD_ARCHS"),
                       ("ptx", "CMK_BUILD_PTX"), ("nvcc", "CMK_BUILD_NVCC")):
        value = str(info[key]).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'#define {macro} "{value}"')
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def cuda_extension_build(force: bool = False, env: Optional[Mapping[str, str]] = None):
    """(ext_modules, cmdclass) for setup(); ([], {}) when the extension is not built this time.

    Raises CudaBuildError when ``force`` (or CONVMIXER_KERNELS_FORCE_BUILD=1) asks for a build
    that cannot happen here.
    """
    env = os.environ if env is None else env
    force = force or flag(env, ENV_FORCE)
    if flag(env, ENV_SKIP) and not force:
        _log(f"{ENV_SKIP} is set: not building the CUDA extension")
        return [], {}
    reason = why_not_buildable(env)
    if reason:
        if force:
            raise CudaBuildError(f"{ENV_FORCE}=1 but the CUDA extension cannot be built: {reason}")
        _log(f"not building the CUDA extension ({reason}); the Triton and torch backends still work. "
             f"To build it later: {BUILD_COMMAND}")
        return [], {}
    archs = parse_archs(env.get(ENV_ARCHS, "") or DEFAULT_ARCHS)
    cuda_home = find_cuda_home(env)
    # torch.utils.cpp_extension reads CUDA_HOME when imported; a wrapper script named nvcc on PATH
    # (as on some images) would otherwise make it guess the wrong root.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch.utils.cpp_extension as cpp_extension

    if cpp_extension.CUDA_HOME != cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    info = build_info(env, archs, cuda_home)
    write_build_info_header(info)
    _log(f"building the CUDA extension for sm_{', sm_'.join(archs)} (+PTX {info['ptx']}) against torch "
         f"{info['torch']} (CUDA {info['cuda']}), nvcc {info['nvcc']}")

    def rel(path):  # setuptools wants sources relative to setup.py
        return os.path.relpath(path, REPO)

    ext = cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=[rel(os.path.join(HERE, "binding.cpp"))] + [rel(s) for s in kernel_sources()],
        include_dirs=[HERE, GENERATED_DIR],
        extra_compile_args={
            "cxx": ["-O3"],  # the C++ standard: torch's BuildExtension picks the one its headers need
            "nvcc": ["-O3", "-lineinfo"] + gencode_flags(archs),
        },
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}
