"""Input-side prologues: BatchNorm's apply folded into the op that reads its output (design.md 3.3).

A BatchNorm apply ``z = act(p) * s + t`` is an affine map per channel of an activated tensor, so the
op that consumes z can build it while it loads p instead of reading a materialized z. Two launchers
of each backend take a prologue:

* depthwise ``conv_stats(..., prologue=Affine)`` and ``input_grad(..., prologue=Affine)``: the conv
  reads ``z = affine(x)`` wherever it reads x (the forward's taps, the weight gradient's operand).
  The conv's zero padding applies to z, not to x: a tap outside the map contributes 0, not
  act(0)*s + t. ``input_grad``'s dx stays the gradient with respect to z.
* pointwise ``linear(..., prologue=Operand)`` and ``input_grad(..., prologue=Operand)``: the GEMM's
  activation operand (A of the forward, r of the weight gradient) is
  ``r = affine(x) + residual'``, ``residual' = residual_affine(residual)`` (or the residual itself),
  so the layer's r = act(a)*s1 + t1 + z_prev is never stored. dx stays the gradient with respect to r.

Rounding follows the materialized composition it replaces: ``affine(t)`` is computed in float32
and rounded to t's dtype (what a stored z would hold); r = ``affine(x) + residual'`` is summed in
float32, the residual term rounded first (it stands for a stored z), and rounded to x's dtype once,
as the per-block apply ``y = act(a)*s + t + x`` is. The ``*_reference`` functions below are the specification
every backend's prologue is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .activation import ACT_CODE, activation_reference
from .batchnorm import SCALE, SHIFT

ACT_NAME = {code: name for name, code in ACT_CODE.items()}


@dataclass(frozen=True)
class Affine:
    """``z = act(t) * finalized[SCALE, c] + finalized[SHIFT, c]`` per channel c (finalized: [6, C] float32)."""

    finalized: Tensor
    act: int  # ACT_CODE


@dataclass(frozen=True)
class Operand:
    """A GEMM operand built on load: ``affine(x) + residual_affine(residual)`` (each part optional)."""

    affine: Optional[Affine] = None
    residual: Optional[Tensor] = None  # same shape and strides as the operand it is added to
    residual_affine: Optional[Affine] = None


def _per_channel(v: Tensor, t: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (t.dim() - 2))) if t.dim() == 4 else v.view(1, -1)


def affine_reference(t: Tensor, affine: Optional[Affine], *, rounded: bool = True) -> Tensor:
    """affine(t), channels on dim 1 ([N, C, H, W] or [M, C]): float32 math (float64 for float64 t),
    rounded to t's dtype unless ``rounded=False``."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if affine is None:
        return t if rounded else t.to(acc)
    g = activation_reference(t.to(acc), ACT_NAME[affine.act])
    z = g * _per_channel(affine.finalized[SCALE], t).to(acc) + _per_channel(affine.finalized[SHIFT], t).to(acc)
    return z.to(t.dtype) if rounded else z


def operand_reference(x: Tensor, operand: Optional[Operand]) -> Tensor:
    """The GEMM operand ``operand`` describes, in x's dtype."""
    if operand is None:
        return x
    r = affine_reference(x, operand.affine, rounded=False)
    if operand.residual is not None:
        r = r + affine_reference(operand.residual, operand.residual_affine).to(r.dtype)
    return r.to(x.dtype)
