"""The depthwise block's launchers (``ops/depthwise_block.py``'s contract) with torch ops, prologue included."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..alloc import empty_output
from ..batchnorm import SCALE, SHIFT
from ..prologue import Affine, affine_reference
from .common import acc_dtype, act, channel, finalize, grad_sums, pre_activation_grad, stats_partials  # noqa: F401


def unsupported(**config) -> Optional[str]:
    return None


def _pad4(weight: Tensor, pads: Tuple[int, int]) -> Tuple[int, int, int, int]:
    kh, kw = weight.shape[-2:]
    return pads[1], kw - 1 - pads[1], pads[0], kh - 1 - pads[0]  # F.pad order: left, right, top, bottom


def _conv(z: Tensor, weight: Tensor, bias: Optional[Tensor], pads) -> Tensor:
    acc = acc_dtype(z)
    return F.conv2d(F.pad(z.to(acc), _pad4(weight, pads)), weight.to(acc), None if bias is None else bias.to(acc),
                    groups=z.shape[1])


def _stored(t: Tensor, like: Tensor) -> Tensor:
    out = empty_output(like, t.shape[1])
    out.copy_(t)
    return out


def conv_stats(x, weight, bias, act_code: int, pads, prologue: Optional[Affine] = None):
    """a = dwconv(z) + b, z = prologue(x) (zero padding on z); partials [3, 1, C] of act(a)."""
    a = _stored(_conv(affine_reference(x, prologue), weight, bias, pads), x)
    return a, stats_partials(act(a.to(acc_dtype(a)), act_code))


def apply(a, x, finalized, act_code: int):
    acc = acc_dtype(a)
    y = act(a.to(acc), act_code) * channel(finalized[SCALE].to(acc), 4) + channel(finalized[SHIFT].to(acc), 4) \
        + x.to(acc)
    return _stored(y, x)


def conv_apply(x, weight, bias, finalized, act_code: int, pads, store_a: bool):
    a, _ = conv_stats(x, weight, bias, act_code, pads)
    return apply(a, x, finalized, act_code), (a if store_a else x.new_empty(0))


def input_grad(dy, a, x, weight, coef, act_code: int, pads, train: bool, need_dx: bool, need_dw: bool,
               need_db: bool, prologue: Optional[Affine] = None):
    """(dx, dw, db): dx = dy + dwconv^T(da) (the gradient with respect to z = prologue(x)), dw = sum da * z."""
    da = pre_activation_grad(dy, a, coef, act_code)
    C = x.shape[1]
    left, right, top, bottom = _pad4(weight, pads)
    zp = F.pad(affine_reference(x, prologue).to(da.dtype), (left, right, top, bottom))
    w = weight.to(da.dtype)
    # no autograd here (custom ops' bodies run below the autograd key): the conv's backward op directly
    gzp, gw, _ = torch.ops.aten.convolution_backward(da, zp, w, None, (1, 1), (0, 0), (1, 1), False, (0, 0), C,
                                                     (True, True, False))
    gz = gzp[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    dx = _stored(dy.to(da.dtype) + gz, x) if need_dx else x.new_empty(0)
    dw = gw.to(weight.dtype) if need_dw else x.new_empty(0)
    db = da.sum((0, 2, 3)).to(weight.dtype) if need_db else x.new_empty(0)
    return dx, dw, db
