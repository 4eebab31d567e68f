"""Output allocation for kernels: ``CONVMIXER_KERNELS_POISON=1`` fills new outputs with NaN
(integers with -1) so that an element a kernel forgot to write shows up in tests."""
from __future__ import annotations

import os

import torch

POISON_ENV = "CONVMIXER_KERNELS_POISON"


def poisoning() -> bool:
    return os.environ.get(POISON_ENV, "0") not in ("", "0")


def empty(shape, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poisoning():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """Like torch.empty_like (memory format preserved), poisoned when asked."""
    out = torch.empty_like(t, dtype=dtype)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
