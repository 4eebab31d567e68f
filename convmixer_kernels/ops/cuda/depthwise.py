"""CUDA-extension backend of the depthwise block (``ops/depthwise_block.py`` holds the op's contract).

The kernels are hand-written CUDA (csrc/kernels/, bound as ``convmixer_kernels._C`` by
csrc/binding.cpp); this file maps the contract's launchers onto the extension's functions.

Memory passes (one unit = one read or write of an N*C*H*W activation, design.md section 4):
  training forward  conv: x -> a and per-tile BN partials (2); finalize (tiny); apply: a, x -> y (3)
  eval forward      one kernel: x -> y (2)
  backward          reduce: dy, a (2); conv^T: dy, a, x -> dx with dW/dB partials (4)
Every reduction (BN statistics, dgamma/dbeta, dW, dB) is split into per-tile partials that are
combined in a fixed order, so results are deterministic run to run.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _cuda_ext
from ..batchnorm import MEAN, RSTD, SCALE, SHIFT, finalized_from_combined
from ..prologue import Affine


def _ext():
    return _cuda_ext.extension()


def _in_layout_of(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (one copy when they differ), so the kernels read both coalesced."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def _prologue_args(prologue: Optional[Affine]) -> tuple:
    """(pro_scale, pro_shift, pro_act) of the extension: the conv reads z = act(x) * scale + shift (ops/prologue.py)."""
    if prologue is None:
        return None, None, 0
    f = prologue.finalized
    if f.dim() != 2 or f.shape[0] <= SHIFT:
        raise ValueError(f"prologue: finalized must be [6, C] float32, got shape {tuple(f.shape)}")
    return f[SCALE].contiguous(), f[SHIFT].contiguous(), int(prologue.act)


# ------------------------------------------------------------------ the contract


def unsupported(*, x: Tensor, weight: Tensor, **_) -> Optional[str]:
    """Why the extension does not take this call (the dispatcher falls back, logging it), or None."""
    error = _cuda_ext.load_error()
    if error:
        return error
    if x.numel() == 0:
        return f"empty input (shape {tuple(x.shape)}): the torch reference handles it"
    n, c, h, w = x.shape
    if n * h * w >= 2**30 or c >= 2**31:
        return f"input shape {tuple(x.shape)}: N*H*W must be below 2^30 and C below 2^31"
    arch = _cuda_ext.device_arch_error(x.device)
    if arch:
        return arch
    channels_last = c > 1 and x.stride(1) == 1  # the layout the kernels write (that of x)
    config = _ext().config_error(n, c, h, w, weight.shape[2], weight.shape[3], channels_last)
    if config:
        return f"{config} (kernel {tuple(weight.shape[2:])}, {'channels_last' if channels_last else 'NCHW'})"
    return None


def conv_stats(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, pads: Tuple[int, int],
               prologue: Optional[Affine] = None):
    """(a, partials): a = dwconv(x) + b in x's dtype and layout; partials [3, T, C] of act(a). With a prologue
    the conv reads z = affine(x) instead of x, built while staging (zero padding applies to z)."""
    a, partials = _ext().forward(x, weight.contiguous(), bias, None, None, act, pads[0], pads[1], True,
                                 *_prologue_args(prologue))
    return a, partials


def finalize(partials: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float) -> Tensor:
    """Partials [3, T, C] -> finalized [6, C]: the extension combines the tiles in index order."""
    combined = _ext().combine(partials)[:, 0]  # [3, C]: count, mean, M2
    return finalized_from_combined(combined, bn_weight, bn_bias, eps)


def apply(a: Tensor, x: Tensor, finalized: Tensor, act: int) -> Tensor:
    """y = act(a) * scale + shift + x."""
    return _ext().apply(a, x, finalized[SCALE].contiguous(), finalized[SHIFT].contiguous(), act)


def conv_apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], finalized: Tensor, act: int,
               pads: Tuple[int, int], store_a: bool):
    """Eval: y = act(dwconv(x) + b) * scale + shift + x; when ``store_a`` (a backward will follow), a is
    stored by the statistics kernel (its partials unused) and y applied from it."""
    weight = weight.contiguous()
    if store_a:
        a, _ = conv_stats(x, weight, bias, act, pads)
        return apply(a, x, finalized, act), a
    (y,) = _ext().forward(x, weight, bias, finalized[SCALE].contiguous(), finalized[SHIFT].contiguous(), act,
                          pads[0], pads[1], False)
    return y, x.new_empty(0)


def grad_sums(dy: Tensor, a: Tensor, stats: Tensor, act: int) -> Tensor:
    """[2, C] float32: (sum dy, sum dy * xhat); the extension gives sum dy * (act(a) - mean) per chunk."""
    dy = _in_layout_of(dy, a)
    sums = _ext().grad_reduce(dy, a, stats[MEAN].contiguous(), act).sum(dim=1)  # torch's sum: fixed order on CUDA
    return torch.stack((sums[0], sums[1] * stats[RSTD]))


def input_grad(dy: Tensor, a: Tensor, x: Tensor, weight: Tensor, coef: Tensor, act: int, pads: Tuple[int, int],
               train: bool, need_dx: bool, need_dw: bool, need_db: bool, prologue: Optional[Affine] = None):
    """(dx, dw, db) with dx = dy + dwconv^T(da), da = (k1*(dy - mean_dy) + k2*(act(a) - mean)) * act'(a)
    (the extension takes the additive form k1*dy + k2*(act(a) - mean) + k3, k3 = -k1 * mean_dy). With a
    prologue, dw = sum da * z reads z = affine(x) (built while staging); dx stays the gradient w.r.t. z."""
    dy = _in_layout_of(dy, a)
    k1, k2, mean_dy, mean = (c.contiguous() for c in coef)
    k3 = -k1 * mean_dy
    dx, dw_part, db_part = _ext().backward(dy, a, x, weight.contiguous(), mean, k1, k2, k3, act, pads[0], pads[1],
                                           train, *_prologue_args(prologue if need_dw else None))
    dw = dw_part.sum(dim=(0, 1)).view(weight.shape).to(weight.dtype) if need_dw else x.new_empty(0)
    db = db_part.sum(dim=(0, 1)).to(weight.dtype) if need_db else x.new_empty(0)
    return (dx if need_dx else x.new_empty(0)), dw, db
