"""Depthwise block on the CUDA extension: y = x + BN(act(dwconv(x) + b)), design.md section 3.1.

The kernels are hand-written CUDA (csrc/kernels/, bound as ``convmixer_kernels._C`` by
csrc/binding.cpp). This file holds, top to bottom: the host launchers (thin calls into the
extension), the two ``torch.library`` custom ops (forward and backward) with their fake
implementations and the autograd registration, so that ``torch.compile(fullgraph=True)``
traces through the block, and ``depthwise_block_cuda`` with the reference's signature plus
``unsupported(**config)``.

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

from .. import _cuda_ext
from . import batchnorm
from .activation import ACT_CODE
from .batchnorm import BatchNormCall
from .depthwise_block import Padding, same_padding
from .dispatch import common_unsupported

# ACT_CODE's numbering is the one cmk::Act in csrc/kernels/params.h uses too.
ACTIVATION_CODES = ACT_CODE


def _ext():
    return _cuda_ext.extension()


# ------------------------------------------------------------------ host launchers


def conv_forward_train(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, pad: Tuple[int, int]):
    """(a, partials): a = dwconv(x) + b in x's dtype and layout; partials [3, T, C] of act(a)."""
    a, partials = _ext().forward(x, weight, bias, None, None, act, pad[0], pad[1], True)
    return a, partials


def conv_forward_eval(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor, act: int,
                      pad: Tuple[int, int]) -> Tensor:
    """y = act(dwconv(x) + b) * scale + shift + x in one kernel."""
    (y,) = _ext().forward(x, weight, bias, scale, shift, act, pad[0], pad[1], False)
    return y


def apply_affine(a: Tensor, x: Tensor, scale: Tensor, shift: Tensor, act: int) -> Tensor:
    """y = act(a) * scale + shift + x."""
    return _ext().apply(a, x, scale, shift, act)


def combine_partials(partials: Tensor) -> Tensor:
    """[3, T, C] -> [3, 1, C], tiles combined in index order (the order of batchnorm.finalize)."""
    return _ext().combine(partials)


def grad_reduce(dy: Tensor, a: Tensor, mean: Tensor, act: int) -> Tuple[Tensor, Tensor]:
    """(sum dy, sum dy * (act(a) - mean)) per channel, float32 [C]."""
    sums = _ext().grad_reduce(dy, a, mean, act).sum(dim=1)  # torch's sum: fixed order on CUDA
    return sums[0], sums[1]


def conv_backward(dy: Tensor, a: Tensor, x: Tensor, weight: Tensor, mean: Tensor, coef_dy: Tensor, coef_g: Tensor,
                  coef_const: Tensor, act: int, pad: Tuple[int, int], batch_stats: bool):
    """(dx, dW float32 [C, KH, KW], dB float32 [C]) with dx = dy + dwconv^T(da),
    da = (coef_dy * dy + coef_g * (act(a) - mean) + coef_const) * act'(a)."""
    dx, dw_part, db_part = _ext().backward(dy, a, x, weight, mean, coef_dy, coef_g, coef_const, act, pad[0], pad[1],
                                           batch_stats)
    return dx, dw_part.sum(dim=(0, 1)), db_part.sum(dim=(0, 1))


def _in_layout_of(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (one copy when they differ), so the kernels read both coalesced."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


# ------------------------------------------------------------------ torch.library ops


# The op is functional (autograd needs that): it reads the running buffers in eval mode but
# never writes them; depthwise_block_cuda updates them from the returned batch statistics.
@torch.library.custom_op("convmixer_kernels::depthwise_block_cuda", mutates_args=())
def depthwise_block_cuda_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                            bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            use_batch_stats: bool, eps: float, activation: str, pad_top: int, pad_left: int,
                            save_for_backward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, a, mean, rstd, var_unbiased). ``a`` is empty unless ``save_for_backward``; mean and
    rstd (float32 [C]) are the statistics y was normalized with (batch or running);
    var_unbiased is the batch's unbiased variance (empty in eval mode)."""
    act, pad = ACTIVATION_CODES[activation], (pad_top, pad_left)
    weight = weight.contiguous()
    if use_batch_stats:
        a, partials = conv_forward_train(x, weight, bias, act, pad)
        combined = combine_partials(partials)  # [3, 1, C]: count, mean, M2
        call = BatchNormCall(bn_weight, bn_bias, None, None, True, 0.0, eps)
        mean, rstd, scale, shift = batchnorm.finalize(combined, call)
        var_unbiased = combined[2, 0] / (combined[0, 0] - 1)
        y = apply_affine(a, x, scale, shift, act)
    else:
        call = BatchNormCall(bn_weight, bn_bias, running_mean, running_var, False, 0.0, eps)
        mean, rstd, scale, shift = batchnorm.eval_stats(call)
        mean = mean.clone()  # .float() of a float32 buffer is the buffer: outputs must not alias inputs
        var_unbiased = rstd.new_empty(0)
        if save_for_backward:  # the backward needs a: store it (its partials go unused)
            a, _ = conv_forward_train(x, weight, bias, act, pad)
            y = apply_affine(a, x, scale, shift, act)
        else:
            y, a = conv_forward_eval(x, weight, bias, scale, shift, act, pad), None
    if not save_for_backward or a is None:
        a = x.new_empty(0)
    return y, a, mean, rstd, var_unbiased


@depthwise_block_cuda_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, activation, pad_top,
      pad_left, save_for_backward):
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    a = torch.empty_like(x) if save_for_backward else x.new_empty(0)
    var = torch.empty_like(stats) if use_batch_stats else stats.new_empty(0)
    return torch.empty_like(x), a, stats, torch.empty_like(stats), var


@torch.library.custom_op("convmixer_kernels::depthwise_block_cuda_backward", mutates_args=())
def depthwise_block_cuda_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], a: Tensor,
                                     mean: Tensor, rstd: Tensor, use_batch_stats: bool, activation: str, pad_top: int,
                                     pad_left: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dgamma, dbeta); the last three float32 [C], design.md section 3.1."""
    act, pad = ACTIVATION_CODES[activation], (pad_top, pad_left)
    dy = _in_layout_of(dy, a)
    sum_dy, sum_dy_xc = grad_reduce(dy, a, mean, act)
    dgamma, dbeta = sum_dy_xc * rstd, sum_dy  # sum dy * xhat, sum dy
    coef_dy = rstd if bn_weight is None else bn_weight.float() * rstd  # gamma * rstd
    if use_batch_stats:  # dg = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
        m = x.numel() // x.shape[1]
        coef_g = -coef_dy * rstd * (dgamma / m)
        coef_const = -coef_dy * (sum_dy / m)
    else:  # running statistics are constants: dg = gamma * rstd * dy
        coef_g = coef_const = torch.zeros_like(rstd)
    dx, dweight, dbias = conv_backward(dy, a, x, weight.contiguous(), mean, coef_dy, coef_g, coef_const, act, pad,
                                       use_batch_stats)
    return dx, dweight.view(weight.shape).to(weight.dtype), dbias, dgamma, dbeta


@depthwise_block_cuda_backward_op.register_fake
def _(dy, x, weight, bn_weight, a, mean, rstd, use_batch_stats, activation, pad_top, pad_left):
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(weight), stats, torch.empty_like(stats), torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, _rm, _rv, use_batch_stats, _eps, activation, pad_top, pad_left,
     _save) = inputs
    _y, a, mean, rstd, _var = output
    ctx.save_for_backward(x, weight, bn_weight, a, mean, rstd)
    ctx.config = (use_batch_stats, activation, pad_top, pad_left)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))


def _backward(ctx, dy, _da, _dmean, _drstd, _dvar):
    x, weight, bn_weight, a, mean, rstd = ctx.saved_tensors
    if a.numel() != x.numel():
        raise RuntimeError("depthwise_block_cuda: the forward ran without saving the pre-activation (no input "
                           "required grad then), so it cannot be differentiated")
    dx, dweight, dbias, dgamma, dbeta = depthwise_block_cuda_backward_op(dy, x, weight, bn_weight, a, mean, rstd,
                                                                         *ctx.config)
    bias_dtype, gamma_dtype, beta_dtype = ctx.dtypes
    cast = lambda g, dtype: None if dtype is None else g.to(dtype)  # noqa: E731
    return (dx, dweight, cast(dbias, bias_dtype), cast(dgamma, gamma_dtype), cast(dbeta, beta_dtype),
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("convmixer_kernels::depthwise_block_cuda", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ entry point


def depthwise_block_cuda(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats: bool,
                         momentum: float, eps: float, *, activation: str, padding: Padding) -> Tensor:
    """The reference's signature (ops/depthwise_block.py), on the CUDA extension."""
    pad_top, pad_left = same_padding(padding, tuple(weight.shape[2:]))
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, bn_weight, bn_bias))
    y, _a, mean, _rstd, var_unbiased = depthwise_block_cuda_op(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, bool(use_batch_stats), float(eps), activation,
        pad_top, pad_left, save)
    if use_batch_stats and running_mean is not None:
        _update_running_stats(running_mean, running_var, float(momentum), mean, var_unbiased)
    return y


def _update_running_stats(running_mean: Tensor, running_var: Tensor, momentum: float, mean: Tensor,
                          var_unbiased: Tensor) -> None:
    """r = (1 - m) r + m * batch, in the buffers' own dtype, as ops/batchnorm.py:finalize_reference does."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_((momentum * mean).to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_((momentum * var_unbiased).to(running_var.dtype))


def unsupported(*, x: Tensor, weight: Tensor, bn: BatchNormCall, compute_dtype, activation: str, padding: Padding,
                **_) -> Optional[str]:
    """Why the CUDA backend does not take this call (the dispatcher falls back, logging it), or None."""
    reason = common_unsupported(x=x, compute_dtype=compute_dtype, residual=True)
    if reason:
        return reason
    if _cuda_ext.load_error():
        return _cuda_ext.load_error()
    if x.dim() != 4:
        return f"input has {x.dim()} dimensions, not 4"
    if x.numel() == 0:
        return f"empty input (shape {tuple(x.shape)}): the torch reference handles it"
    if activation not in ACTIVATION_CODES:
        return f"activation {activation!r} is not one of {sorted(ACTIVATION_CODES)}"
    n, c, h, w = x.shape
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        return f"weight shape {tuple(weight.shape)} is not a depthwise [C, 1, KH, KW] weight for C={c}"
    try:
        same_padding(padding, tuple(weight.shape[2:]))
    except ValueError as e:
        return str(e)
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
