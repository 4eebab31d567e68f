"""BatchNorm pieces shared by both fused blocks.

1. Module-side bookkeeping: ``batchnorm_call(bn)`` does exactly what
   ``nn.BatchNorm2d.forward`` does around ``F.batch_norm`` (num_batches_tracked,
   the momentum rule, which buffers are passed, batch vs running statistics), so a
   fused block keeps the reference's semantics whatever the backend.
2. ``check_batchnorm_call`` raises the errors ``F.batch_norm`` raises.
3. The statistics format every fused backend uses, and the finalize step that
   turns per-tile partials into mean/rstd, updates the running buffers and emits
   the per-channel affine ``s = gamma * rstd``, ``t = beta - mean * s``.

Statistics format: a float32 tensor ``partials`` of shape ``[3, T, C]`` holding,
for each of T tiles and C channels, (count, mean, M2) of the activated values in
that tile (Welford). ``finalize_reference`` combines the tiles in index order with
Chan's formula, so the result does not depend on how the tiles were scheduled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BatchNormCall:
    """Everything one BatchNorm application needs, as F.batch_norm takes it."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]  # None: do not read or update running stats
    running_var: Optional[torch.Tensor]
    use_batch_stats: bool  # normalize with the batch's statistics (training, or no buffers)
    momentum: float  # the exponential average factor for this step
    eps: float


def batchnorm_call(bn: nn.modules.batchnorm._BatchNorm) -> BatchNormCall:
    """The bookkeeping of ``_BatchNorm.forward``, step for step (it increments num_batches_tracked)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
            else:
                momentum = bn.momentum
    if bn.training:
        use_batch_stats = True
    else:
        use_batch_stats = bn.running_mean is None and bn.running_var is None
    pass_buffers = not bn.training or bn.track_running_stats
    return BatchNormCall(
        weight=bn.weight,
        bias=bn.bias,
        running_mean=bn.running_mean if pass_buffers else None,
        running_var=bn.running_var if pass_buffers else None,
        use_batch_stats=use_batch_stats,
        momentum=momentum,
        eps=bn.eps,
    )


def check_batchnorm_call(shape, call: BatchNormCall) -> None:
    """The checks of ``F.batch_norm``, with its error classes and messages."""
    if call.use_batch_stats:
        F._verify_batch_size(list(shape))
    if call.use_batch_stats and call.eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {call.eps}")
    if call.eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {call.eps}")


def batchnorm_reference(t: torch.Tensor, call: BatchNormCall) -> torch.Tensor:
    return F.batch_norm(t, call.running_mean, call.running_var, call.weight, call.bias,
                        call.use_batch_stats, call.momentum, call.eps)


# ------------------------------------------------------------ statistics format


def tile_partials_reference(g: torch.Tensor, tiles: int = 1) -> torch.Tensor:
    """Partials ``[3, T, C]`` (count, mean, M2) of ``g`` [N, C, H, W], splitting N*H*W into ``tiles`` chunks.

    A reference for what a statistics epilogue emits; used by tests of ``finalize``.
    """
    C = g.shape[1]
    flat = g.transpose(0, 1).reshape(C, -1).float()
    chunks = torch.tensor_split(flat, tiles, dim=1)
    out = torch.zeros(3, tiles, C, dtype=torch.float32, device=g.device)
    for i, ch in enumerate(chunks):
        n = ch.shape[1]
        if n == 0:
            continue
        mean = ch.mean(dim=1)
        out[0, i] = n
        out[1, i] = mean
        out[2, i] = ((ch - mean[:, None]) ** 2).sum(dim=1)
    return out


def finalize_reference(partials: torch.Tensor, call: BatchNormCall) -> Tuple[torch.Tensor, ...]:
    """Combine ``partials`` [3, T, C] in tile order; update running stats; return (mean, rstd, scale, shift).

    All four are float32 [C]. Running buffers are updated in place, in their own
    dtype, with the unbiased variance, exactly as F.batch_norm does.
    """
    count, mean, m2 = partials[0, 0].clone(), partials[1, 0].clone(), partials[2, 0].clone()
    for i in range(1, partials.shape[1]):
        nb, mb, m2b = partials[0, i], partials[1, i], partials[2, i]
        n = count + nb
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        delta = mb - mean
        mean = mean + delta * nb / safe_n
        m2 = m2 + m2b + delta * delta * count * nb / safe_n
        count = n
    total = count
    var = m2 / total
    rstd = torch.rsqrt(var + call.eps)
    if call.running_mean is not None:
        m = call.momentum
        unbiased = m2 / (total - 1)
        with torch.no_grad():
            call.running_mean.mul_(1 - m).add_((m * mean).to(call.running_mean.dtype))
            call.running_var.mul_(1 - m).add_((m * unbiased).to(call.running_var.dtype))
    return (mean, rstd) + affine_from_stats(mean, rstd, call)


def eval_stats(call: BatchNormCall) -> Tuple[torch.Tensor, ...]:
    """(mean, rstd, scale, shift) from the running buffers, for eval mode."""
    mean = call.running_mean.float()
    rstd = torch.rsqrt(call.running_var.float() + call.eps)
    return (mean, rstd) + affine_from_stats(mean, rstd, call)


def affine_from_stats(mean: torch.Tensor, rstd: torch.Tensor, call: BatchNormCall):
    scale = rstd if call.weight is None else call.weight.float() * rstd
    shift = -mean * scale if call.bias is None else call.bias.float() - mean * scale
    return scale, shift


def finalize(partials: torch.Tensor, call: BatchNormCall) -> Tuple[torch.Tensor, ...]:
    """The finalize every fused backend calls: the Triton kernel where Triton can run on
    ``partials`` (CUDA, or the interpreter on CPU), else ``finalize_reference``. Same order, same result."""
    from ..backends import environment_reason

    if environment_reason("triton", partials.device) is None:
        from .batchnorm_triton import finalize_triton

        with torch.no_grad():
            return finalize_triton(partials, call)
    return finalize_reference(partials, call)
