"""Plumbing every Triton kernel of the package shares, in one place.

* where kernels run: ``interpreting(device)`` (CPU tensors under ``TRITON_INTERPRET=1``),
  ``num_sms(device)``, and ``static_target()``, under which launchers pick the launch
  configurations they would pick on an sm_90 GPU even for tensors on the ``meta`` device
  (``convmixer-kernels inspect`` records those launches and compiles them ahead of time);
* ``needs_int64``: the one int64-offset policy;
* ``Autotuner``: one autotuner and its cache, with an explicit error policy;
* ``sum_rows``: the one fixed-order reduction kernel (deterministic sums of partials).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, TypeVar

import torch
import triton
import triton.language as tl

from ...backends import log_event, triton_interpreting
from ..alloc import empty
from ..tuning import autotune_enabled

# ------------------------------------------------------------------ where kernels run


@dataclass(frozen=True)
class StaticTarget:
    """A GPU that is not here: what launchers size their grids for in ``static_target()``."""

    sms: int = 132  # H200 (convmixer_kernels.static.ceilings holds the full table)
    capability: int = 90


_static: List[StaticTarget] = []


@contextlib.contextmanager
def static_target(target: Optional[StaticTarget] = None):
    """Launchers act as on ``target`` (default: an H200): CUDA configurations, its SM count, no autotuning."""
    _static.append(target or StaticTarget())
    try:
        yield _static[-1]
    finally:
        _static.pop()


def static_active() -> Optional[StaticTarget]:
    return _static[-1] if _static else None


def interpreting(device: torch.device) -> bool:
    """True when kernels on ``device`` run in Triton's interpreter (CPU tensors), not on a GPU."""
    if _static:
        return False
    return device.type != "cuda" and triton_interpreting()


def num_sms(device: torch.device) -> int:
    if _static:
        return _static[-1].sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so that persistent loops run more than once


def p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element offset of some tensor does not fit in int32 (then kernels use int64 offsets)."""
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0
        if span >= 2 ** 31 - 1 or t.numel() >= 2 ** 31 - 1:
            return True
    return False


# ------------------------------------------------------------------ autotuning

Config = TypeVar("Config", bound=Hashable)


def _is_resource_error(e: BaseException) -> bool:
    """A candidate that cannot compile or does not fit this GPU (skip it), as opposed to a runtime fault."""
    from triton.compiler.errors import CompilationError

    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, CompilationError) or bool(names & {"OutOfResources", "PTXASError"})


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Autotuner:
    """Chooses a launch configuration per key, measured once per process and cached.

    Error policy: a candidate whose compilation fails or that needs more registers / shared
    memory than the GPU has is skipped; any other error (a CUDA fault: sticky, so every later
    launch would fail too) propagates. While a CUDA graph is being captured nothing is timed:
    the default is used (logged) and not cached. Only ``launch`` runs inside the timed region;
    it must not allocate (allocate its outputs once, outside).
    """

    def __init__(self, name: str):
        self.name = name
        self.cache: Dict[tuple, object] = {}

    def pick(self, key: tuple, candidates: Sequence[Config], launch: Callable[[Config], None],
             timer: Optional[Callable[[Callable[[], None]], float]] = None) -> Config:
        default = candidates[0]
        if len(candidates) == 1 or not autotune_enabled() or _static:
            return default
        if key in self.cache:
            return self.cache[key]
        if _capturing():
            log_event(logging.INFO, "%s: CUDA graph capture in progress; using the default configuration %s "
                      "untuned", self.name, default)
            return default
        timer = timer or _do_bench
        best, best_ms = None, float("inf")
        for cand in candidates:
            try:
                ms = timer(lambda: launch(cand))
            except Exception as e:
                if not _is_resource_error(e):
                    raise
                log_event(logging.DEBUG, "%s: candidate %s skipped: %s", self.name, cand, e)
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        if best is None:
            raise RuntimeError(f"{self.name}: no launch configuration compiles for this call (tried {len(candidates)})")
        self.cache[key] = best
        return best


def _do_bench(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


# ------------------------------------------------------------------ the fixed-order reduction


@triton.jit
def _sum_rows_kernel(src_ptr, out_ptr, T, L, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """out[l] = sum over t of src[t, l]: SPLIT interleaved partial sums (t = s, s + SPLIT, ...) run in
    parallel lanes, then are added in a fixed tree; the order never depends on scheduling."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lanes = tl.arange(0, SPLIT)
    mask = cols < L
    acc = tl.zeros((SPLIT, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, SPLIT):
        t = t0 + lanes
        m = (t < T)[:, None] & mask[None, :]
        acc += tl.load(src_ptr + t.to(tl.int64)[:, None] * L + cols[None, :], mask=m, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask)


def sum_rows(src: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Sum a float32 [T, ...] tensor over its first dimension in a fixed order -> [...] (bitwise reproducible)."""
    src = src.contiguous()
    T, L = src.shape[0], math.prod(src.shape[1:])
    out = empty(tuple(src.shape[1:]), dtype=dtype, device=src.device)
    if interpreting(src.device):
        BLOCK, SPLIT = 16, 2
    elif L >= 512 * num_sms(src.device):  # wide: programs along L fill the GPU; rows in order
        BLOCK, SPLIT = 512, 1
    else:  # narrow: more, smaller programs, each with up to 32 rows in flight
        BLOCK, SPLIT = 32, min(32, p2(T))
    _sum_rows_kernel[(triton.cdiv(L, BLOCK),)](src, out, T, L, BLOCK=BLOCK, SPLIT=SPLIT)
    return out
