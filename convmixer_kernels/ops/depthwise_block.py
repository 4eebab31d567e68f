"""Depthwise block: y = x + BN(act(dwconv(x, w) + b)), design.md section 3.1.

This file holds the op's reference (``depthwise_block_reference``), its front
function (``depthwise_block``) and its backend registrations. Every backend's
implementation takes the reference's exact signature.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import backends
from .activation import activation_reference
from .batchnorm import BatchNormCall
from .dispatch import common_unsupported, run_block

OP = "depthwise_block"

Padding = Union[str, Tuple[int, int]]


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
                              activation: str, padding: Padding) -> torch.Tensor:
    """The unfused composition, op for op as the reference module runs it."""
    a = F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])
    g = activation_reference(a, activation)
    z = F.batch_norm(g, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum, eps)
    return z + x


def depthwise_block(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn: BatchNormCall, *,
                    activation: str, padding: Padding, backend: str = "auto") -> Tuple[torch.Tensor, str]:
    """y = x + BN(act(dwconv(x) + b)) on the chosen backend; returns (y, backend that ran)."""
    return run_block(OP, depthwise_block_reference, x, weight, bias, bn, backend,
                     activation=activation, padding=padding)


def _fused_unsupported(**config) -> Optional[str]:
    return common_unsupported(residual=True, **config)


backends.register_op(OP, "torch", f"{__name__}:depthwise_block_reference")
