"""The pointwise block's launchers (``ops/pointwise_block.py``'s contract) with torch ops, prologue included.
p is the row-major [M, Cout] matrix of the contract; activations are [N, C, H, W] in any layout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..alloc import empty, empty_output
from ..batchnorm import SCALE, SHIFT
from ..prologue import Operand, operand_reference
from . import common
from .common import acc_dtype, act, channel, finalize, pre_activation_grad, stats_partials  # noqa: F401


def unsupported(**config) -> Optional[str]:
    return None


def rows(t: Tensor) -> Tensor:
    """[N, C, H, W] -> the [M, C] pixel-major view (a copy unless channels_last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def as_activation(m: Tensor, like: Tensor) -> Tensor:
    """[M, C] -> [N, C, H, W] in ``like``'s output format."""
    n, _, h, w = like.shape
    out = empty_output(like, m.shape[1])
    out.copy_(m.view(n, h, w, -1).permute(0, 3, 1, 2))
    return out


def linear(x, weight, bias, act_code: int, stats: bool, prologue: Optional[Operand] = None):
    """p = r W^T + b, r = prologue(x); partials [3, 1, Cout] of act(p) when ``stats``."""
    acc = acc_dtype(x)
    r = rows(operand_reference(x, prologue)).to(acc)
    p32 = r @ weight.flatten(1).to(acc).t()
    if bias is not None:
        p32 = p32 + bias.to(acc)
    p = empty(p32.shape, dtype=x.dtype, device=x.device)
    p.copy_(p32)
    part = stats_partials(act(p.to(acc), act_code).t()[None, :, :, None]) if stats else None
    return p, part


def apply(p, x, finalized, act_code: int):
    acc = acc_dtype(p)
    z = act(p.to(acc), act_code) * channel(finalized[SCALE].to(acc), 2) + channel(finalized[SHIFT].to(acc), 2)
    return as_activation(z.to(p.dtype), x)


def linear_apply(x, weight, bias, finalized, act_code: int):
    p, _ = linear(x, weight, bias, act_code, False)
    return apply(p, x, finalized, act_code)


def grad_sums(dz, p, stats, act_code: int) -> Tensor:
    """[2, Cout] float32: (sum dz, sum dz * xhat) per channel."""
    return common.grad_sums(rows(dz), p, stats, act_code)


def input_grad(dz, p, x, weight, coef, act_code: int, train: bool, need_dx: bool, need_dw: bool, need_db: bool,
               prologue: Optional[Operand] = None):
    """(dx, dW, db): dp = act'(p) * BN_bwd(dz); dx = dp W (the gradient with respect to r = prologue(x)),
    dW = dp^T r, db = sum dp."""
    dp = pre_activation_grad(rows(dz), p, coef, act_code)
    w = weight.flatten(1).to(dp.dtype)
    dx = as_activation((dp @ w).to(x.dtype), x) if need_dx else x.new_empty(0)
    dw = x.new_empty(0)
    if need_dw:
        dw = (dp.t() @ rows(operand_reference(x, prologue)).to(dp.dtype)).view(weight.shape).to(weight.dtype)
    db = dp.sum(0).to(weight.dtype) if need_db else x.new_empty(0)
    return dx, dw, db
