"""Triton pieces of the BatchNorm statistics format (see batchnorm.py): the per-tile
statistics every statistics epilogue emits, and the finalize kernel."""
import torch
import triton
import triton.language as tl

from .alloc import empty


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
def _finalize_kernel(partials_ptr, T, C, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr,
                     mean_ptr, rstd_ptr, scale_ptr, shift_ptr, momentum, eps,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    stride = T * C  # partials is [3, T, C], contiguous
    count = tl.load(partials_ptr + cols, mask=cmask, other=0.0)
    mean = tl.load(partials_ptr + stride + cols, mask=cmask, other=0.0)
    m2 = tl.load(partials_ptr + 2 * stride + cols, mask=cmask, other=0.0)
    for t in range(1, T):  # fixed order: the result does not depend on scheduling
        nb = tl.load(partials_ptr + t * C + cols, mask=cmask, other=0.0)
        mb = tl.load(partials_ptr + stride + t * C + cols, mask=cmask, other=0.0)
        m2b = tl.load(partials_ptr + 2 * stride + t * C + cols, mask=cmask, other=0.0)
        n = count + nb
        frac = nb / tl.maximum(n, 1.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * count * frac
        count = n
    var = m2 / count
    rstd = 1.0 / tl.sqrt(var + eps)
    if UPDATE_RUNNING:
        unbiased = m2 / (count - 1.0)
        rm = tl.load(rmean_ptr + cols, mask=cmask).to(tl.float32)
        rv = tl.load(rvar_ptr + cols, mask=cmask).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(rmean_ptr + cols, rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rvar_ptr + cols, rv.to(rvar_ptr.dtype.element_ty), mask=cmask)
    scale = rstd
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + cols, mask=cmask).to(tl.float32) * rstd
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + cols, mask=cmask).to(tl.float32)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, rstd, mask=cmask)
    tl.store(scale_ptr + cols, scale, mask=cmask)
    tl.store(shift_ptr + cols, shift, mask=cmask)


def finalize_triton(partials: torch.Tensor, call):
    """``batchnorm.finalize_reference`` as one small kernel: same inputs, outputs and order."""
    assert partials.dtype == torch.float32 and partials.dim() == 3 and partials.shape[0] == 3
    partials = partials.contiguous()
    _, T, C = partials.shape
    outs = [empty((C,), dtype=torch.float32, device=partials.device) for _ in range(4)]
    update = call.running_mean is not None
    dummy = outs[0]
    BLOCK_C = min(256, triton.next_power_of_2(max(C, 1)))
    _finalize_kernel[(triton.cdiv(C, BLOCK_C),)](
        partials, T, C,
        call.weight if call.weight is not None else dummy, call.bias if call.bias is not None else dummy,
        call.running_mean if update else dummy, call.running_var if update else dummy,
        *outs, float(call.momentum), float(call.eps),
        HAS_WEIGHT=call.weight is not None, HAS_BIAS=call.bias is not None, UPDATE_RUNNING=update,
        BLOCK_C=BLOCK_C)
    return tuple(outs)
