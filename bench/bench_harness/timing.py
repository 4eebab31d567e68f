"""GPU timing for the benchmarks: CUDA events, L2-defeating input rotation, peak memory, named ranges.

* ``time_cuda``: median GPU time from CUDA events around each call, after warm-up,
  with inputs rotated (several copies cycled) when one set would stay in L2.
* ``gpu_range``: a ``torch.profiler.record_function`` + NVTX range, so traces name
  which provider and which fused op ran.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch


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
