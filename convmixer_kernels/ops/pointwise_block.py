"""Pointwise block: z = BN(act(W r + b)), a 1x1 conv as a GEMM, design.md section 3.2.

This file holds the op's reference (``pointwise_block_reference``), its front
function (``pointwise_block``) and its backend registrations. Every backend's
implementation takes the reference's exact signature.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from .activation import activation_reference
from .batchnorm import BatchNormCall
from .dispatch import common_unsupported, run_block

OP = "pointwise_block"


def pointwise_block_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              use_batch_stats: bool, momentum: float, eps: float, *,
                              activation: str) -> torch.Tensor:
    """The unfused composition, op for op as the reference module runs it."""
    p = F.conv2d(x, weight, bias)
    g = activation_reference(p, activation)
    return F.batch_norm(g, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum, eps)


def pointwise_block(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn: BatchNormCall, *,
                    activation: str, backend: str = "auto") -> Tuple[torch.Tensor, str]:
    """z = BN(act(conv1x1(x) + b)) on the chosen backend; returns (z, backend that ran)."""
    return run_block(OP, pointwise_block_reference, x, weight, bias, bn, backend, activation=activation)


def _fused_unsupported(**config) -> Optional[str]:
    return common_unsupported(residual=False, **config)


backends.register_op(OP, "torch", f"{__name__}:pointwise_block_reference")
