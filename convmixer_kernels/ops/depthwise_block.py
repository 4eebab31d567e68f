"""Depthwise block: y = x + BN(act(dwconv(x, w) + b)), design.md section 3.1 — the op's contract.

This file is the op's interface, the same for every backend: the reference
(``depthwise_block_reference``), the front function (``depthwise_block``), the two
``torch.library`` ops with their fakes and autograd formula, and the registry entries.
Each backend implements the same launchers in its own file, imported only when it runs:

* ``ops/triton/depthwise.py`` (Triton: per call on CUDA cores or, for bf16/fp16 with k >= 7, on
  tensor cores through ``ops/triton/depthwise_tc.py``, chosen in that file's ``_path``),
  ``ops/cuda/depthwise.py`` (the CUDA extension);
* ``conv_stats(x, weight, bias, act, pads, prologue=None) -> (a, partials [3, T, C])``,
  ``finalize(partials, bn_weight, bn_bias, eps) -> finalized [6, C]``, ``apply(a, x, finalized, act) -> y``,
  ``conv_apply(x, weight, bias, finalized, act, pads, store_a) -> (y, a)`` (eval, one kernel),
  ``grad_sums(dy, a, stats, act) -> [2, C]`` and ``input_grad(dy, a, x, weight, coef, act, pads,
  train, need_dx, need_dw, need_db, prologue=None) -> (dx, dw, db)``, plus ``unsupported(**config)``.
  ``prologue=`` (a ``prologue.Affine``, documented in ``ops/prologue.py``): the conv reads
  z = act(x) * s + t wherever it reads x (zero padded as z); the blocks' ops never pass one, the fused
  layer stack (``ops/layer_stack.py``) does.

The activation is always its ``ACT_CODE`` int; statistics use ``ops/batchnorm.py``'s formats;
the running buffers are updated once, by ``batchnorm.update_running_stats``, for every backend.
Memory passes of each backend are in its file's docstring.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import batchnorm
from .activation import ACT_CODE, activation_reference
from .alloc import empty_output, output_format
from .batchnorm import BatchNormCall
from .dispatch import common_unsupported, on_device, refuse_double_backward, run_block

OP = "depthwise_block"

Padding = Union[str, Tuple[int, int]]


# ====================================================================== reference


def same_padding(padding: Padding, kernel_size: Tuple[int, int]) -> Tuple[int, int]:
    """(top, left) zero padding of a stride-1 conv whose output has the input's size.

    ``padding="same"`` pads (k-1)//2 on the top/left
    and the rest on the bottom/right, so an even k pads more at the bottom/right.
    An explicit symmetric padding p is "same" only when 2p == k-1.
    """
    kh, kw = kernel_size
    if padding == "same":
        return (kh - 1) // 2, (kw - 1) // 2
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r} does not keep the feature map's size")
    ph, pw = padding
    if 2 * ph != kh - 1 or 2 * pw != kw - 1:
        raise ValueError(f"padding={tuple(padding)} with kernel {kernel_size} does not keep the feature map's size")
    return ph, pw


def depthwise_block_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              use_batch_stats: bool, momentum: float, eps: float, *,
                              activation: str, padding: Padding, sync_group: Optional[str] = None) -> torch.Tensor:
    """The unfused composition, op for op as the reference module runs it."""
    a = F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])
    g = activation_reference(a, activation)
    z = batchnorm.batch_norm_reference(g, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum,
                                       eps, sync_group)
    return z + x



# ====================================================================== the op contract


@torch.library.custom_op("convmixer_kernels::depthwise_block_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
            bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
            use_batch_stats: bool, eps: float, act: int, pad_top: int, pad_left: int, store_a: bool,
            backend: str, sync_group: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    """-> (y, a, stats): stats is the finalized [6, C] of ``batchnorm.py`` (batch statistics in training,
    running ones in eval); ``a`` is empty unless ``store_a``. Reads, never writes, the running buffers."""
    kernels = backends.kernels(OP, backend)
    pads = (pad_top, pad_left)
    if x.numel() == 0:  # empty batch: nothing to normalize (the caller leaves running statistics alone)
        stats = torch.zeros(6, x.shape[1], dtype=torch.float32, device=x.device)
        return empty_output(x), (empty_output(x) if store_a else x.new_empty(0)), stats
    with on_device(x):
        if use_batch_stats:
            a, partials = kernels.conv_stats(x, weight, bias, act, pads)
            stats = batchnorm.batch_statistics(kernels, partials, bn_weight, bn_bias, eps, sync_group)
            y = kernels.apply(a, x, stats, act)
        else:
            stats = batchnorm.finalized_from_running(running_mean, running_var, bn_weight, bn_bias, eps)
            y, a = kernels.conv_apply(x, weight, bias, stats, act, pads, store_a)
    return y, (a if store_a else x.new_empty(0)), stats


@_fwd_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, act, pad_top, pad_left,
      store_a, backend, sync_group=""):
    out = lambda: x.new_empty(x.shape).contiguous(memory_format=output_format(x))  # noqa: E731
    return out(), (out() if store_a else x.new_empty(0)), x.new_empty((6, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("convmixer_kernels::depthwise_block_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, a: Tensor, weight: Tensor, bn_weight: Optional[Tensor], stats: Tensor,
            use_batch_stats: bool, act: int, pad_top: int, pad_left: int, need_dx: bool, need_dw: bool,
            need_db: bool, need_dbn: bool, backend: str, sync_group: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dw, db, dgamma, dbeta), dgamma and dbeta float32; gradients not asked for are empty."""
    kernels = backends.kernels(OP, backend)
    N, C, H, W = x.shape
    M = N * H * W
    f32 = dict(dtype=torch.float32, device=x.device)
    if M == 0:
        return (empty_output(x).zero_() if need_dx else x.new_empty(0),
                torch.zeros_like(weight) if need_dw else x.new_empty(0),
                weight.new_zeros(C) if need_db else x.new_empty(0), torch.zeros(C, **f32), torch.zeros(C, **f32))
    with on_device(x):
        sums = kernels.grad_sums(dy, a, stats, act) if (use_batch_stats or need_dbn) else None
        dgamma = sums[1].clone() if need_dbn else torch.zeros(C, **f32)  # clones: outputs may not alias
        dbeta = sums[0].clone() if need_dbn else torch.zeros(C, **f32)
        if not (need_dx or need_dw or need_db):
            return x.new_empty(0), x.new_empty(0), x.new_empty(0), dgamma, dbeta
        coef = batchnorm.backward_coefficients(sums, stats, bn_weight, use_batch_stats, sync_group)
        dx, dw, db = kernels.input_grad(dy, a, x, weight, coef, act, (pad_top, pad_left), use_batch_stats,
                                        need_dx, need_dw, need_db)
    return dx, dw, db, dgamma, dbeta


@_bwd_op.register_fake
def _(dy, x, a, weight, bn_weight, stats, use_batch_stats, act, pad_top, pad_left, need_dx, need_dw, need_db,
      need_dbn, backend, sync_group=""):
    C = x.shape[1]
    return (x.new_empty(x.shape).contiguous(memory_format=output_format(x)) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else x.new_empty(0),
            weight.new_empty((C,)) if need_db else x.new_empty(0),
            x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, _, _, use_batch_stats, _, act, pad_top, pad_left, store_a, backend = inputs[:14]
    sync_group = inputs[14] if len(inputs) > 14 else ""
    _, a, stats = output
    ctx.mark_non_differentiable(a, stats)
    # x and a are the only activation-sized tensors kept (design.md section 4)
    ctx.save_for_backward(x, a, weight, bn_weight, stats)
    ctx.config = (use_batch_stats, act, pad_top, pad_left, store_a, backend, sync_group)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))


def _backward(ctx, dy, _da, _dstats):
    x, a, weight, bn_weight, stats = ctx.saved_tensors
    use_batch_stats, act, pad_top, pad_left, store_a, backend, sync_group = ctx.config
    if not store_a:
        raise RuntimeError("depthwise_block: the forward ran without keeping the pre-activation (no input "
                           "required grad then), so it cannot be differentiated")
    refuse_double_backward(OP, backend, dy)
    need = ctx.needs_input_grad
    bias_dtype, gamma_dtype, beta_dtype = ctx.dtypes
    need_db = need[2] and bias_dtype is not None
    dx, dw, db, dgamma, dbeta = torch.ops.convmixer_kernels.depthwise_block_bwd(
        dy, x, a, weight, bn_weight, stats, use_batch_stats, act, pad_top, pad_left, need[0], need[1], need_db,
        need[3] or need[4], backend, sync_group)
    return (dx if need[0] else None, dw if need[1] else None, db.to(bias_dtype) if need_db else None,
            dgamma.to(gamma_dtype) if need[3] else None, dbeta.to(beta_dtype) if need[4] else None,
            None, None, None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_block_fused(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats: bool,
                          momentum: float, eps: float, *, activation: str, padding: Padding, backend: str,
                          sync_group: Optional[str] = None) -> Tensor:
    """The reference's signature and semantics on a fused ``backend`` (running buffers updated in place)."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_block ({backend}): expected x [N, C, H, W] and weight [C, 1, kh, kw], "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    pad_top, pad_left = same_padding(padding, tuple(weight.shape[-2:]))
    store_a = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                              for t in (x, weight, bias, bn_weight, bn_bias))
    y, _, stats = torch.ops.convmixer_kernels.depthwise_block_fwd(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, bool(use_batch_stats), float(eps),
        ACT_CODE[activation], pad_top, pad_left, store_a, backend, sync_group or "")
    if x.numel() > 0:
        batchnorm.update_running_stats(BatchNormCall(bn_weight, bn_bias, running_mean, running_var,
                                                     use_batch_stats, momentum, eps), stats)  # joint-batch stats
        if store_a and use_batch_stats and running_mean is not None:
            y = batchnorm.saved_after_update(y, stats)  # activation checkpointing recomputes the update too
    return y


def unsupported(x, weight, bn, compute_dtype, activation, padding, **config) -> Optional[str]:
    """The contract's own limits (every fused backend shares them); each backend adds its own."""
    reason = common_unsupported(x=x, compute_dtype=compute_dtype, residual=True)
    if reason:
        return reason
    if activation not in ACT_CODE:
        return f"activation {activation!r} has no fused kernel"
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        return f"input {tuple(x.shape)} with weight {tuple(weight.shape)} is not a depthwise conv"
    if x.shape[1] == 0:
        return "the input has no channels"
    try:
        same_padding(padding, tuple(weight.shape[-2:]))
    except ValueError as e:
        return str(e)
    for name, t in (("BatchNorm weight", bn.weight), ("BatchNorm bias", bn.bias),
                    ("running_mean", bn.running_mean), ("running_var", bn.running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[1] or not t.is_floating_point()):
            return f"{name} of shape {tuple(t.shape)} and dtype {t.dtype} does not fit {x.shape[1]} channels"
    return None


# ====================================================================== front function and registry


def depthwise_block(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn: BatchNormCall, *, activation: str,
                    padding: Padding, backend: str = "auto", verdicts: Optional[dict] = None,
                    on_start=None) -> Tuple[Tensor, str]:
    """y = x + BN(act(dwconv(x) + b)) on the chosen backend; returns (y, backend that ran).
    ``verdicts``: a caller's cache of backend choices (see ``dispatch.run_block``)."""
    return run_block(OP, x, weight, bias, bn, backend, verdicts, on_start, activation=activation, padding=padding)


backends.register_op(OP, reference=depthwise_block_reference, fused=depthwise_block_fused, unsupported=unsupported,
                     kernels={"triton": "convmixer_kernels.ops.triton.depthwise",
                              "cuda": "convmixer_kernels.ops.cuda.depthwise"})
