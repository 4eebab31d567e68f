"""Pointwise block: z = BN(act(W r + b)), a 1x1 conv as a GEMM, design.md section 3.2 — the op's contract.

This file is the op's interface, the same for every backend: the reference
(``pointwise_block_reference``), the front function (``pointwise_block``), the two
``torch.library`` ops with their fakes and autograd formula, and the registry entries.
Each backend implements the same launchers in its own file, imported only when it runs
(``ops/triton/pointwise.py``):

* ``linear(x, weight, bias, act, stats) -> (p [M, Cout] row-major, partials [3, T, Cout] or None)``,
  ``finalize(partials, bn_weight, bn_bias, eps) -> finalized [6, Cout]``,
  ``apply(p, x, finalized, act) -> z``, ``linear_apply(x, weight, bias, finalized, act) -> z``
  (eval without a backward: one kernel), ``grad_sums(dz, p, stats, act) -> [2, Cout]`` and
  ``input_grad(dz, p, x, weight, coef, act, train, need_dx, need_dw, need_db) -> (dx, dw, db)``,
  plus ``unsupported(**config)``.

The "cuda" backend has no pointwise implementation of its own (a hand-written GEMM would not beat
the Triton tensor-core GEMM); asking for it runs the best available backend instead, logged, and
``last_backend`` names the one that ran. The activation is always its ``ACT_CODE`` int; statistics
use ``ops/batchnorm.py``'s formats; the running buffers are updated once, by
``batchnorm.update_running_stats``, for every backend.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import batchnorm
from .activation import ACT_CODE, activation_reference
from .alloc import empty_output, output_format
from .batchnorm import BatchNormCall
from .dispatch import common_unsupported, on_device, refuse_double_backward, run_block

OP = "pointwise_block"


# ====================================================================== reference


def pointwise_block_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              use_batch_stats: bool, momentum: float, eps: float, *,
                              activation: str, sync_group: Optional[str] = None) -> Tensor:
    """The unfused composition, op for op as the reference module runs it."""
    p = F.conv2d(x, weight, bias)
    g = activation_reference(p, activation)
    return batchnorm.batch_norm_reference(g, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum,
                                          eps, sync_group)


# ====================================================================== the op contract


@torch.library.custom_op("convmixer_kernels::pointwise_block_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
            bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
            use_batch_stats: bool, eps: float, act: int, store_p: bool, backend: str,
            sync_group: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    """-> (z, p, stats): p is the [M, Cout] pre-activation (empty unless ``store_p``), stats the finalized
    [6, Cout] of ``batchnorm.py``. Reads, never writes, the running buffers."""
    kernels = backends.kernels(OP, backend)
    N, _, H, W = x.shape
    cout = weight.shape[0]
    no_p = x.new_empty(0)
    if N * H * W == 0:  # empty batch: no statistics (the caller leaves running buffers alone)
        p = x.new_empty((0, cout)) if store_p else no_p
        return empty_output(x, cout), p, torch.zeros(6, cout, dtype=torch.float32, device=x.device)
    with on_device(x):
        if use_batch_stats:
            p, partials = kernels.linear(x, weight, bias, act, True)
            stats = batchnorm.batch_statistics(kernels, partials, bn_weight, bn_bias, eps, sync_group)
            z = kernels.apply(p, x, stats, act)
        else:
            stats = batchnorm.finalized_from_running(running_mean, running_var, bn_weight, bn_bias, eps)
            if store_p:
                p, _ = kernels.linear(x, weight, bias, act, False)
                z = kernels.apply(p, x, stats, act)
            else:
                z = kernels.linear_apply(x, weight, bias, stats, act)
    return z, (p if store_p else no_p), stats


@_fwd_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, act, store_p, backend,
      sync_group=""):
    N, _, H, W = x.shape
    cout = weight.shape[0]
    z = x.new_empty((N, cout, H, W)).contiguous(memory_format=output_format(x))
    p = x.new_empty((N * H * W, cout) if store_p else (0,))
    return z, p, x.new_empty((6, cout), dtype=torch.float32)


@torch.library.custom_op("convmixer_kernels::pointwise_block_bwd", mutates_args=())
def _bwd_op(dz: Tensor, x: Tensor, p: Tensor, weight: Tensor, bn_weight: Optional[Tensor], stats: Tensor,
            use_batch_stats: bool, act: int, need_dx: bool, need_dw: bool, need_db: bool, need_dbn: bool,
            backend: str, sync_group: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dW, db, dgamma, dbeta), dgamma and dbeta float32; gradients not asked for are empty."""
    kernels = backends.kernels(OP, backend)
    N, cin, H, W = x.shape
    cout = weight.shape[0]
    M = N * H * W
    f32 = dict(dtype=torch.float32, device=x.device)
    if M == 0:
        return (empty_output(x, cin).zero_() if need_dx else x.new_empty(0),
                torch.zeros_like(weight) if need_dw else x.new_empty(0),
                weight.new_zeros(cout) if need_db else x.new_empty(0), torch.zeros(cout, **f32),
                torch.zeros(cout, **f32))
    with on_device(x):
        sums = kernels.grad_sums(dz, p, stats, act) if (use_batch_stats or need_dbn) else None
        dgamma = sums[1].clone() if need_dbn else torch.zeros(cout, **f32)  # clones: outputs may not alias
        dbeta = sums[0].clone() if need_dbn else torch.zeros(cout, **f32)
        if not (need_dx or need_dw or need_db):
            return x.new_empty(0), x.new_empty(0), x.new_empty(0), dgamma, dbeta
        coef = batchnorm.backward_coefficients(sums, stats, bn_weight, use_batch_stats, sync_group)
        dx, dw, db = kernels.input_grad(dz, p, x, weight, coef, act, use_batch_stats, need_dx, need_dw, need_db)
    return dx, dw, db, dgamma, dbeta


@_bwd_op.register_fake
def _(dz, x, p, weight, bn_weight, stats, use_batch_stats, act, need_dx, need_dw, need_db, need_dbn, backend,
      sync_group=""):
    N, cin, H, W = x.shape
    cout = weight.shape[0]
    dx = x.new_empty((N, cin, H, W)).contiguous(memory_format=output_format(x)) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else x.new_empty(0)
    db = weight.new_empty((cout,)) if need_db else x.new_empty(0)
    return dx, dw, db, x.new_empty((cout,), dtype=torch.float32), x.new_empty((cout,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, _, _, use_batch_stats, _, act, store_p, backend = inputs[:12]
    sync_group = inputs[12] if len(inputs) > 12 else ""
    _, p, stats = output
    ctx.mark_non_differentiable(p, stats)
    ctx.save_for_backward(x, weight, p, bn_weight, stats)
    ctx.config = (use_batch_stats, act, store_p, backend, sync_group)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))


def _backward(ctx, dz, _dp, _dstats):
    x, weight, p, bn_weight, stats = ctx.saved_tensors
    use_batch_stats, act, store_p, backend, sync_group = ctx.config
    if not store_p:
        raise RuntimeError("pointwise_block: the forward ran without keeping the pre-activation (no input "
                           "required grad then), so it cannot be differentiated")
    refuse_double_backward(OP, backend, dz)
    need = ctx.needs_input_grad
    bias_dtype, gamma_dtype, beta_dtype = ctx.dtypes
    need_db = need[2] and bias_dtype is not None
    dx, dw, db, dgamma, dbeta = torch.ops.convmixer_kernels.pointwise_block_bwd(
        dz, x, p, weight, bn_weight, stats, use_batch_stats, act, need[0], need[1], need_db, need[3] or need[4],
        backend, sync_group)
    return (dx if need[0] else None, dw if need[1] else None, db.to(bias_dtype) if need_db else None,
            dgamma.to(gamma_dtype) if need[3] else None, dbeta.to(beta_dtype) if need[4] else None,
            None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> None:
    """Errors that name the offending shape / dtype / device (RuntimeError, as F.conv2d raises)."""
    where = f"pointwise_block ({backend})"
    if x.dim() != 4:
        raise RuntimeError(f"{where}: expected a 4D [N, C, H, W] input, got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise RuntimeError(f"{where}: expected a [Cout, Cin, 1, 1] weight, got {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"{where}: input of shape {tuple(x.shape)} has {x.shape[1]} channels "
                           f"but the weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise RuntimeError(f"{where}: bias of shape {tuple(bias.shape)} for {weight.shape[0]} output channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(f"{where}: {name} is {t.dtype} on {t.device} but the input is {x.dtype} on {x.device}")


def pointwise_block_fused(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats: bool,
                          momentum: float, eps: float, *, activation: str, backend: str,
                          sync_group: Optional[str] = None) -> Tensor:
    """The reference's signature and semantics on a fused ``backend`` (running buffers updated in place)."""
    _check_inputs(x, weight, bias, backend)
    store_p = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                              for t in (x, weight, bias, bn_weight, bn_bias))
    z, _, stats = torch.ops.convmixer_kernels.pointwise_block_fwd(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, bool(use_batch_stats), float(eps),
        ACT_CODE[activation], store_p, backend, sync_group or "")
    if x.numel() > 0:
        batchnorm.update_running_stats(BatchNormCall(bn_weight, bn_bias, running_mean, running_var,
                                                     use_batch_stats, momentum, eps), stats)  # joint-batch stats
        if store_p and use_batch_stats and running_mean is not None:
            z = batchnorm.saved_after_update(z, stats)  # activation checkpointing recomputes the update too
    return z


def unsupported(x, weight, compute_dtype, activation, **config) -> Optional[str]:
    """The contract's own limits (every fused backend shares them); each backend adds its own."""
    reason = common_unsupported(x=x, compute_dtype=compute_dtype, residual=False)
    if reason:
        return reason
    if activation not in ACT_CODE:
        return f"activation {activation!r} has no fused kernel"
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        return f"weight of shape {tuple(weight.shape)} is not a 1x1 conv weight"
    return None


# ====================================================================== front function and registry


def pointwise_block(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn: BatchNormCall, *, activation: str,
                    backend: str = "auto", verdicts: Optional[dict] = None,
                    on_start=None) -> Tuple[Tensor, str]:
    """z = BN(act(conv1x1(x) + b)) on the chosen backend; returns (z, backend that ran)."""
    return run_block(OP, x, weight, bias, bn, backend, verdicts, on_start, activation=activation)


backends.register_op(OP, reference=pointwise_block_reference, fused=pointwise_block_fused, unsupported=unsupported,
                     kernels={"triton": "convmixer_kernels.ops.triton.pointwise"})
