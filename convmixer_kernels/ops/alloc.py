"""Output allocation for kernels: ``CONVMIXER_KERNELS_POISON=1`` fills new outputs with NaN
(integers with -1) so that an element a kernel forgot to write shows up in tests."""
from __future__ import annotations

import os
from typing import Optional

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


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a conv gives for input x (design.md 5.12): channels_last for a channels_last x,
    else contiguous NCHW (a transposed or strided x included)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x: torch.Tensor, channels: Optional[int] = None) -> torch.Tensor:
    """An [N, channels, H, W] output (channels default: x's) in the format a conv gives for x, poisoned when asked."""
    n, c, h, w = x.shape
    return empty((n, c if channels is None else channels, h, w), dtype=x.dtype, device=x.device,
                 memory_format=output_format(x))
