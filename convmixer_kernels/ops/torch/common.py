"""Helpers shared by the torch launchers."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..activation import activation_reference
from ..batchnorm import MEAN, RSTD, finalize_reference, tile_partials_reference
from ..prologue import ACT_NAME


def acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def act(t: Tensor, code: int) -> Tensor:
    return activation_reference(t, ACT_NAME[code])


def act_and_grad(t: Tensor, code: int):
    """(act(t), act'(t)) in closed form, as PyTorch's backward formulas (no autograd: custom ops' bodies run
    below the autograd key). relu'(0) = relu'(NaN) = 0, as threshold_backward."""
    name = ACT_NAME[code]
    g = act(t, code)
    if name == "relu":
        return g, (t > 0).to(t.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(t * math.sqrt(0.5)))
        return g, cdf + t * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    inner = math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)
    th = torch.tanh(inner)
    d_inner = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * t * t)
    return g, 0.5 * (1 + th) + 0.5 * t * (1 - th * th) * d_inner


def channel(v: Tensor, ndim: int) -> Tensor:
    """A per-channel [C] vector shaped to broadcast over [N, C, H, W] (ndim 4) or [M, C] (ndim 2)."""
    return v.view(1, -1, 1, 1) if ndim == 4 else v.view(1, -1)


def stats_partials(g: Tensor) -> Tensor:
    """[3, 1, C] (count, mean, M2) of g [N, C, H, W], accumulated in float64 and stored in the float32
    format, as PyTorch's CPU BatchNorm accumulates its statistics (in double) before storing them."""
    return tile_partials_reference(g.double()) if g.dtype != torch.float64 else tile_partials_reference(g)


def finalize(partials, bn_weight, bn_bias, eps: float) -> Tensor:
    """The reference finalize, in float64 (then the float32 format), as PyTorch's CPU BatchNorm."""
    return finalize_reference(partials.double(), bn_weight, bn_bias, eps).float()


def grad_sums(dy: Tensor, pre: Tensor, stats: Tensor, code: int) -> Tensor:
    """[2, C] float32: (sum dy, sum dy * xhat), xhat = (act(pre) - mean) * rstd; dy and pre [N, C, H, W] or [M, C]."""
    acc = acc_dtype(pre)
    dims = (0, 2, 3) if pre.dim() == 4 else (0,)
    g = act(pre.to(acc), code)
    xhat = (g - channel(stats[MEAN].to(acc), pre.dim())) * channel(stats[RSTD].to(acc), pre.dim())
    d = dy.to(acc)
    return torch.stack((d.sum(dims), (d * xhat).sum(dims))).float()


def pre_activation_grad(dy: Tensor, pre: Tensor, coef: Tensor, code: int) -> Tensor:
    """act'(pre) * (k1 * (dy - mean_dy) + k2 * (act(pre) - mean)), coef = [4, C] (k1, k2, mean_dy, mean), in acc dtype."""
    acc = acc_dtype(pre)
    nd = pre.dim()
    k1, k2, mean_dy, mean = (channel(c.to(acc), nd) for c in coef)
    g, d = act_and_grad(pre.to(acc), code)
    return d * (k1 * (dy.to(acc) - mean_dy) + k2 * (g - mean))
