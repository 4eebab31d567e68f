"""The compile-only toolchain: ptxas, cuobjdump, nvcc; ahead-of-time sm_90 compilation.

Triton kernels compile through ``triton.compile`` on an ``ASTSource`` with a
``GPUTarget("cuda", 90, 32)`` (no GPU needed); the CUDA extension's kernels through
``nvcc -arch=sm_90 -Xptxas -v``. Resources come from ``ptxas -v`` (registers, spill
bytes, stack, static shared memory, barriers); the machine code from ``cuobjdump -sass``.
Triton must not be in interpreter mode (``TRITON_INTERPRET=1``) in the process that compiles:
``@triton.jit`` then yields interpreter functions that cannot be compiled.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

CAPABILITY = 90


def _triton_bin() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return path if os.path.isdir(path) else None


@functools.lru_cache(maxsize=None)
def find(tool: str) -> List[str]:
    """Candidate paths of ``tool`` (ptxas, cuobjdump, nvcc), newest-first guesses: triton's, then CUDA's."""
    out = []
    tb = _triton_bin()
    names = [tool] + ([f"{tool}-blackwell"] if tool == "ptxas" else [])
    for name in names[::-1]:
        if tb and os.path.exists(os.path.join(tb, name)):
            out.append(os.path.join(tb, name))
    for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = os.path.join(d, "bin", tool) if d else ""
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    w = shutil.which(tool)
    if w and w not in out:
        out.append(w)
    return out


def missing_tools() -> Optional[str]:
    """Why static inspection cannot run here, or None."""
    miss = [t for t in ("ptxas", "cuobjdump") if not find(t)]
    if miss:
        return (f"{' and '.join(miss)} not found (looked in triton/backends/nvidia/bin, $CUDA_HOME/bin, "
                "/usr/local/cuda/bin, PATH): install triton (it ships both) or the CUDA toolkit")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET=1 is set: kernels are interpreter functions here and cannot be compiled"
    return None


def versions() -> Dict[str, Optional[str]]:
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            return out[-1] if out else None
        except (OSError, subprocess.SubprocessError):
            return None

    v = {}
    for tool in ("ptxas", "cuobjdump", "nvcc"):
        paths = find(tool)
        v[tool] = f"{paths[0]}: {first_line([paths[0], '--version'])}" if paths else None
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    import torch
    v["torch"] = torch.__version__
    return v


@dataclass
class Resources:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0
    barriers: int = 0
    local: int = 0
    ptxas: str = ""

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'|Function properties for (\S+)")


def parse_ptxas_v(text: str) -> Dict[str, Resources]:
    """``ptxas -v`` output -> {function: Resources}."""
    out: Dict[str, Resources] = {}
    cur = None
    for line in text.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1) or m.group(2)
            out.setdefault(cur, Resources())
            continue
        if cur is None:
            continue
        r = out[cur]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            r.stack, r.spill_stores, r.spill_loads = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            r.registers = int(m.group(1))
            m2 = re.search(r"used (\d+) barriers", line)
            r.barriers = int(m2.group(1)) if m2 else 0
            m3 = re.search(r"(\d+) bytes smem", line)
            r.static_smem = int(m3.group(1)) if m3 else 0
            m4 = re.search(r"(\d+) bytes lmem", line)
            r.local = int(m4.group(1)) if m4 else 0
    return out


def run_ptxas(ptx: str, workdir: str) -> Dict[str, Resources]:
    """``ptxas -v`` with the first ptxas that accepts this PTX version."""
    src = os.path.join(workdir, "k.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    errors = []
    for ptxas in find("ptxas"):
        p = subprocess.run([ptxas, f"-arch=sm_{CAPABILITY}a", "-v", src, "-o", os.path.join(workdir, "v.cubin")],
                           capture_output=True, text=True, timeout=300)
        if p.returncode == 0:
            res = parse_ptxas_v(p.stdout + p.stderr)
            for r in res.values():
                r.ptxas = ptxas
            return res
        errors.append(f"{ptxas}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    raise RuntimeError("no ptxas accepted the PTX: " + "; ".join(errors))


def sass_of(cubin_path: str) -> str:
    tool = find("cuobjdump")[0]
    p = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {p.stderr.strip()}")
    return p.stdout


@dataclass
class Compiled:
    name: str
    resources: Resources
    sass: str
    dynamic_smem: int = 0  # Triton: shared memory the kernel allocates at launch
    num_warps: int = 4
    extra: dict = field(default_factory=dict)


def compile_triton(fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> Compiled:
    """Compile one recorded launch for sm_90 ahead of time; ptxas -v and SASS of the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", CAPABILITY, 32)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    with tempfile.TemporaryDirectory(prefix="cmk-static-") as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = sass_of(cubin)
        res = run_ptxas(kernel.asm["ptx"], tmp)
    md = kernel.metadata
    name = md.name if hasattr(md, "name") else fn.__name__
    r = res.get(name) or next(iter(res.values()), Resources())
    return Compiled(name, r, text, int(getattr(md, "shared", 0) or 0), int(getattr(md, "num_warps", 4)))


# ------------------------------------------------------------------ the CUDA extension's instances


def compile_cuda_sources(csrc: str, workdir: str, arch: int = CAPABILITY) -> Dict[str, Compiled]:
    """nvcc every ``csrc/kernels/*.cu`` (no torch headers needed) for sm_<arch>; {mangled name: Compiled}."""
    nvcc = find("nvcc")
    if not nvcc:
        raise RuntimeError("nvcc not found: the CUDA extension's kernels cannot be inspected")
    out: Dict[str, Compiled] = {}
    for cu in sorted(glob.glob(os.path.join(csrc, "kernels", "*.cu"))):
        obj = os.path.join(workdir, os.path.basename(cu) + ".cubin")
        p = subprocess.run([nvcc[0], f"-arch=sm_{arch}", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v",
                            "-I", os.path.join(csrc, "kernels"), "-I", csrc, cu, "-o", obj],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"nvcc {os.path.basename(cu)}: {p.stderr.strip()[-2000:]}")
        res = parse_ptxas_v(p.stdout + p.stderr)
        from .sass import parse

        text = sass_of(obj)
        for func in parse(text):
            r = res.get(func.name, Resources())
            r.ptxas = nvcc[0] + " -Xptxas -v"
            out[func.name] = Compiled(func.name, r, text, 0, 0, {"source": os.path.relpath(cu, os.path.dirname(csrc))})
    return out
