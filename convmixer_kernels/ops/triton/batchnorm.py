"""Triton pieces of the BatchNorm statistics formats (``ops/batchnorm.py``): the per-tile
statistics every statistics epilogue emits, and the finalize kernel."""
import torch
import triton
import triton.language as tl

from ..alloc import empty
from .common import interpreting, p2


@triton.jit
def tile_stats(g, mask, AXIS: tl.constexpr):
    """(count, mean, M2) of the masked-in values of the 2D float32 block ``g`` along ``AXIS``.

    Two passes over registers (mean, then squared deviations): as exact as Welford, and
    what a tile of the [3, T, C] partials holds.
    """
    m = mask.to(tl.float32)
    count = tl.sum(m, axis=AXIS)
    mean = tl.sum(g * m, axis=AXIS) / tl.maximum(count, 1.0)
    if AXIS == 0:
        d = (g - mean[None, :]) * m
    else:
        d = (g - mean[:, None]) * m
    return count, mean, tl.sum(d * d, axis=AXIS)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's formula: the (count, mean, M2) of two disjoint sets combined."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _finalize_kernel(partials_ptr, out_ptr, T, C, weight_ptr, bias_ptr, eps,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    """partials [3, T, C] -> finalized [6, C] (mean, rstd, count, M2, scale, shift).

    SPLIT lanes combine the tiles t = lane, lane + SPLIT, ... in order, in parallel; the lanes
    are then combined pairwise in a fixed tree. Both orders are fixed: deterministic results.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    lanes = tl.arange(0, SPLIT)
    cmask = cols < C
    plane = T * C  # partials is [3, T, C], contiguous
    # float64: the combine is tiny, and its rounding would otherwise reach every gradient through mean and rstd
    count = tl.zeros((SPLIT, BLOCK_C), dtype=tl.float64)
    mean = tl.zeros((SPLIT, BLOCK_C), dtype=tl.float64)
    m2 = tl.zeros((SPLIT, BLOCK_C), dtype=tl.float64)
    for t0 in range(0, T, SPLIT):
        t = t0 + lanes
        m = (t < T)[:, None] & cmask[None, :]
        offs = t[:, None] * C + cols[None, :]
        nb = tl.load(partials_ptr + offs, mask=m, other=0.0).to(tl.float64)
        mb = tl.load(partials_ptr + plane + offs, mask=m, other=0.0).to(tl.float64)
        m2b = tl.load(partials_ptr + 2 * plane + offs, mask=m, other=0.0).to(tl.float64)
        count, mean, m2 = _chan(count, mean, m2, nb, mb, m2b)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan)
    rstd = (1.0 / tl.sqrt(m2 / tl.where(cmask, count, 1.0) + eps)).to(tl.float32)  # masked-off lanes: count 0
    count = count.to(tl.float32)
    mean = mean.to(tl.float32)
    m2 = m2.to(tl.float32)
    scale = rstd
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + cols, mask=cmask).to(tl.float32) * rstd
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + cols, mask=cmask).to(tl.float32)
    tl.store(out_ptr + cols, mean, mask=cmask)
    tl.store(out_ptr + C + cols, rstd, mask=cmask)
    tl.store(out_ptr + 2 * C + cols, count, mask=cmask)
    tl.store(out_ptr + 3 * C + cols, m2, mask=cmask)
    tl.store(out_ptr + 4 * C + cols, scale, mask=cmask)
    tl.store(out_ptr + 5 * C + cols, shift, mask=cmask)


def finalize(partials: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """``batchnorm.finalize_reference`` as one small kernel: partials [3, T, C] -> finalized [6, C]."""
    assert partials.dtype == torch.float32 and partials.dim() == 3 and partials.shape[0] == 3
    partials = partials.contiguous()
    _, T, C = partials.shape
    out = empty((6, C), dtype=torch.float32, device=partials.device)
    if interpreting(partials.device):
        BLOCK_C, SPLIT = min(16, p2(C)), 2
    else:  # narrow channel blocks: C / 32 programs, each with up to 32 tiles in flight
        BLOCK_C, SPLIT = min(32, p2(C)), min(32, p2(T))
    _finalize_kernel[(triton.cdiv(C, BLOCK_C),)](
        partials, out, T, C, weight if weight is not None else out, bias if bias is not None else out, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SPLIT=SPLIT, BLOCK_C=BLOCK_C)
    return out
