"""Timing, roofline and run metadata shared by ``bench/`` and ``convmixer-kernels profile``.

* ``Roofline``/``Cost``: the roofline numbers of design.md section 7 and a traffic/FLOP
  model per workload. Bytes are the *fused per-module budget* of design.md section 4
  (so "achieved GB/s" of any provider is comparable, and a fused path at 100% moves
  exactly its budget at copy bandwidth); FLOPs are the convolutions' multiply-adds x 2.
  The floor of a workload is the sum over its parts of max(bytes / bandwidth,
  GEMM FLOPs / GEMM peak + direct FLOPs / FMA peak).
* ``time_cuda``: median GPU time from CUDA events around each call, after warm-up,
  with inputs rotated (several copies cycled) when one set would stay in L2.
* ``gpu_range``: a ``torch.profiler.record_function`` + NVTX range, so traces name
  which provider and which fused op ran.
* ``run_metadata``: GPU name, versions, git commit and date for every result file.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

# ------------------------------------------------------------------ roofline


@dataclass(frozen=True)
class Roofline:
    """Peak rates of the GPU the targets are stated for (design.md section 7: lent H100 SXM)."""

    name: str = "H100 SXM (design.md section 7)"
    bandwidth: float = 3.0e12  # bytes/s, measured copy bandwidth
    gemm_half: float = 790e12  # FLOP/s, bf16/fp16 tensor-core GEMM
    fma_fp32: float = 67e12  # FLOP/s, fp32 FMA (spec): depthwise convs and fp32 GEMMs without tf32

    def gemm_peak(self, elem_bytes: int) -> float:
        return self.gemm_half if elem_bytes == 2 else self.fma_fp32

    def as_dict(self) -> dict:
        return {"name": self.name, "bandwidth_GBps": self.bandwidth / 1e9, "gemm_half_TFLOPs": self.gemm_half / 1e12,
                "fma_fp32_TFLOPs": self.fma_fp32 / 1e12}


H100 = Roofline()


@dataclass
class Part:
    name: str
    bytes: float
    gemm_flops: float = 0.0  # tensor-core work (1x1 convs, the patch conv, the head)
    direct_flops: float = 0.0  # CUDA-core work (the depthwise conv)

    def floor_s(self, roof: Roofline, elem_bytes: int) -> float:
        return max(self.bytes / roof.bandwidth,
                   self.gemm_flops / roof.gemm_peak(elem_bytes) + self.direct_flops / roof.fma_fp32)


@dataclass
class Cost:
    """Traffic and work of one call of a workload, in parts that run as separate kernels."""

    elem_bytes: int
    parts: List[Part] = field(default_factory=list)

    def add(self, name: str, bytes: float, gemm_flops: float = 0.0, direct_flops: float = 0.0) -> "Cost":
        self.parts.append(Part(name, bytes, gemm_flops, direct_flops))
        return self

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def flops(self) -> float:
        return sum(p.gemm_flops + p.direct_flops for p in self.parts)

    def floor_s(self, roof: Roofline = H100) -> float:
        return sum(p.floor_s(roof, self.elem_bytes) for p in self.parts)

    def metrics(self, seconds: float, roof: Roofline = H100) -> Dict[str, float]:
        """GB/s and TFLOP/s achieved at ``seconds`` per call, and the % of the floor reached."""
        return {"bytes": self.bytes, "flops": self.flops, "gbps": self.bytes / seconds / 1e9,
                "tflops": self.flops / seconds / 1e12, "floor_ms": self.floor_s(roof) * 1e3,
                "roofline_pct": 100.0 * self.floor_s(roof) / seconds}


# Fused per-module budgets (design.md section 4), in full reads/writes of one activation.
UNITS = {
    ("dwconv", "fwd"): 2, ("dwconv", "bwd"): 3,  # x -> y; dy, x -> dx (+ dw partials)
    ("dw_block", "fwd"): 5, ("dw_block", "fwd_eval"): 2, ("dw_block", "bwd"): 6,
    ("pw_block", "fwd"): 4, ("pw_block", "fwd_eval"): 2, ("pw_block", "bwd"): 9,
    ("stem", "fwd"): 4, ("stem", "fwd_eval"): 2, ("stem", "bwd"): 5,  # no dx for the image
}


def block_cost(op: str, n: int, c: int, h: int, w: int, k: int, elem_bytes: int, *, training: bool,
               backward: bool) -> Cost:
    """Cost of one depthwise conv ("dwconv"), depthwise block ("dw_block") or pointwise block ("pw_block")."""
    m = n * h * w
    unit = m * c * elem_bytes
    cost = Cost(elem_bytes)
    gemm = 2.0 * m * c * c if op == "pw_block" else 0.0
    direct = 2.0 * m * c * k * k if op in ("dwconv", "dw_block") else 0.0
    fwd_key = "fwd" if training or op == "dwconv" else "fwd_eval"
    cost.add(f"{op} fwd", UNITS[(op, fwd_key)] * unit, gemm, direct)
    if backward:  # dx and dW: twice the forward's work
        cost.add(f"{op} bwd", UNITS[(op, "bwd")] * unit, 2 * gemm, 2 * direct)
    return cost


def convmixer_cost(dim: int, depth: int, kernel_size: int, patch_size: int, image_size: int, batch: int,
                   elem_bytes: int, n_params: int, *, training: bool, in_chans: int = 3,
                   n_classes: int = 1000) -> Cost:
    """Cost of a ConvMixer forward (inference) or training step (forward, backward, AdamW step)."""
    g = image_size // patch_size
    m = batch * g * g
    unit = m * dim * elem_bytes
    image = batch * in_chans * image_size * image_size * 4.0  # the user's float32 images
    stem_gemm = 2.0 * m * in_chans * patch_size ** 2 * dim
    cost = Cost(elem_bytes)
    cost.add("stem fwd", UNITS[("stem", "fwd" if training else "fwd_eval")] * unit + image, stem_gemm)
    for op in ("dw_block", "pw_block"):
        per = block_cost(op, batch, dim, g, g, kernel_size, elem_bytes, training=training, backward=training)
        for p in per.parts:
            cost.add(p.name + f" x{depth}", depth * p.bytes, depth * p.gemm_flops, depth * p.direct_flops)
    cost.add("pool + head", unit + 2.0 * batch * dim * n_classes, 2.0 * batch * dim * n_classes)
    if training:
        cost.add("stem bwd", UNITS[("stem", "bwd")] * unit + image, 2 * stem_gemm)
        cost.add("head bwd", unit, 4.0 * batch * dim * n_classes)
        cost.add("AdamW step", 28.0 * n_params)  # fp32 p, g, m, v read; p, m, v written
    return cost


# ------------------------------------------------------------------ timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    rotated: int  # input copies cycled through

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "reps": self.reps,
                "rotated_inputs": self.rotated}


def l2_bytes(device=None) -> int:
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20)


def rotation_count(bytes_per_set: float, device=None, cap: int = 16) -> int:
    """How many input copies to cycle so that consecutive calls do not hit in L2 (1 if one set is 2x L2)."""
    return max(1, min(cap, math.ceil(2 * l2_bytes(device) / max(bytes_per_set, 1.0))))


def time_cuda(step: Callable[[int], object], *, rotated: int = 1, warmup: int = 3, rep_ms: float = 300.0,
              min_reps: int = 5, max_reps: int = 200) -> Timing:
    """Median time of ``step(i)`` on the GPU, measured with CUDA events around each call.

    ``step(i)`` should use input copy ``i % rotated``. Warm-up calls run first (they
    also absorb cuDNN's and Triton's first-use compilation); the number of timed
    calls is chosen so they take about ``rep_ms``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(2):
        step(i)
        i += 1
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 2, 1e-3)
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        step(i)
        e.record()
        i += 1
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], reps, rotated)


def peak_memory_mb(step: Callable[[], object]) -> float:
    """Extra GPU memory one call needs at its peak (max allocated during it minus allocated before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


@contextlib.contextmanager
def gpu_range(name: str):
    """A named range in torch.profiler traces and in Nsight (NVTX) timelines."""
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


# ------------------------------------------------------------------ metadata


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata() -> dict:
    """What a result file needs to be traced: the GPU, versions, the commit and the date."""
    from . import __version__

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "convmixer_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "roofline": H100.as_dict(),
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:  # triton missing: the record says so
        meta["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu_detail"] = f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    return meta


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "unknown"


class ResultsFile:
    """Records of one run, rewritten to one JSON file after every record, with the run's metadata
    (a run cut short, say by a device time limit, still leaves what it measured).

    ``path`` is a file, or a folder where ``<kind>-<gpu>-<date>-<commit>.json`` is created.
    """

    def __init__(self, path: str, kind: str, meta: Optional[dict] = None):
        self.target, self.kind, self.meta = path, kind, meta
        self.records: List[dict] = []
        self.path: Optional[str] = None

    def add(self, record: dict) -> None:
        if self.meta is None:
            self.meta = run_metadata()
        if self.path is None:
            if self.target.endswith(".json"):
                self.path = self.target
            else:
                date = str(self.meta.get("date", ""))[:19].replace(":", "")
                gpu, commit = slug(self.meta.get("gpu") or "cpu"), str(self.meta.get("commit"))[:7]
                name = f"{self.kind}-{gpu}-{date}-{commit}.json"
                self.path = os.path.join(self.target, name)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.records.append(record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"schema": f"convmixer-kernels-{self.kind}/1", "meta": self.meta, "results": self.records},
                      f, indent=1)
        os.replace(tmp, self.path)
