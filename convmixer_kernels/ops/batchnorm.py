"""BatchNorm pieces shared by both fused blocks.

1. Module-side bookkeeping: ``batchnorm_call(bn)`` does exactly what
   ``nn.BatchNorm2d.forward`` does around ``F.batch_norm`` (num_batches_tracked,
   the momentum rule, which buffers are passed, batch vs running statistics), so a
   fused block keeps the reference's semantics whatever the backend.
2. ``check_batchnorm_call`` raises the errors ``F.batch_norm`` raises.
3. The statistics formats every fused backend uses, the reference finalize, the one
   running-buffer update and the backward's per-channel coefficients.

Statistics formats (float32):
* ``partials [3, T, C]``: for each of T tiles and C channels, (count, mean, M2) of the
  activated values in that tile (what a statistics epilogue writes).
* ``finalized [6, C]``, rows ``MEAN, RSTD, COUNT, M2, SCALE, SHIFT``: the combined batch
  statistics, ``rstd = 1/sqrt(M2/count + eps)`` and the per-channel affine of the apply step,
  ``s = gamma * rstd``, ``t = beta - mean * s``. Eval fills it from the running buffers
  (count = M2 = 0). The first four rows are what a block's forward op returns as ``stats``.
Every backend's finalize combines tiles in a fixed order, so results do not depend on how
tiles were scheduled; running buffers are updated only by ``update_running_stats``, outside
the ops, for every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

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
    sync_group: Optional[str] = None  # SyncBatchNorm: the process group whose joint batch is normalized


def batchnorm_call(bn: nn.modules.batchnorm._BatchNorm) -> BatchNormCall:
    """The bookkeeping of ``_BatchNorm.forward``, step for step (it increments num_batches_tracked)."""
    call, count = deferred_batchnorm_call(bn)
    count()
    return call


def deferred_batchnorm_call(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[BatchNormCall, Callable[[], None]]:
    """``batchnorm_call`` without its side effect: (the call, a function that counts the batch).

    The fused modules count the batch only once the call is known to run (after the backend
    choice, before BatchNorm's own checks, which raise after counting as in the reference), so a
    call refused earlier leaves ``num_batches_tracked`` as it was.
    """
    # the dicts directly: nn.Module.__getattr__ is slow, and this runs on every call
    params, buffers = bn._parameters, bn._buffers
    tracked = buffers.get("num_batches_tracked")
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    training = bn.training
    momentum = 0.0 if bn.momentum is None else bn.momentum
    counts = training and bn.track_running_stats and tracked is not None
    if counts and bn.momentum is None:  # cumulative moving average, over the batches including this one
        momentum = 1.0 / (float(tracked) + 1.0)
    use_batch_stats = training or (running_mean is None and running_var is None)
    pass_buffers = not training or bn.track_running_stats
    call = BatchNormCall(params.get("weight"), params.get("bias"), running_mean if pass_buffers else None,
                         running_var if pass_buffers else None, use_batch_stats, momentum, bn.eps,
                         sync_group_of(bn) if training and _may_sync(bn) else None)

    def count():
        if counts:
            tracked.add_(1)

    return call, count


# ------------------------------------------------------------ SyncBatchNorm


def _may_sync(bn: nn.Module) -> bool:
    return isinstance(bn, nn.SyncBatchNorm) or "process_group" in bn.__dict__  # convmixer_kernels.SyncBatchNorm


def sync_group_of(bn: nn.Module) -> Optional[str]:
    """The name of the process group an nn.SyncBatchNorm normalizes over, or None when it acts as a plain
    BatchNorm (not a SyncBatchNorm, no process group initialized, or a group of one), as nn.SyncBatchNorm
    decides."""
    import torch.distributed as dist

    if not _may_sync(bn) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else None


def process_group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def gather_partials(finalized: torch.Tensor, group_name: str) -> torch.Tensor:
    """This rank's finalized statistics -> partials [3, world, C] of every rank, in rank order: one
    all-gather of a fixed-size buffer, no host synchronization. Finalizing them gives the joint batch's."""
    import torch.distributed as dist

    group = process_group(group_name)
    local = torch.stack((finalized[COUNT], finalized[MEAN], finalized[M2]))
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.shape[0], local.shape[1]))  # gloo wants the concatenated shape
    dist.all_gather_into_tensor(out, local, group=group)
    return out.view(world, 3, -1).transpose(0, 1).contiguous()


def sum_across(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """t summed over the process group (one all-reduce), e.g. the backward's two per-channel sums."""
    import torch.distributed as dist

    out = t.clone()
    dist.all_reduce(out, group=process_group(group_name))
    return out


def sync_batch_norm_reference(g: torch.Tensor, running_mean, running_var, weight, bias, momentum: float, eps: float,
                              group_name: str) -> torch.Tensor:
    """nn.SyncBatchNorm's training forward as a composition of differentiable ops, on any device (PyTorch's
    own refuses CPU tensors): every rank's (count, mean, M2) gathered, combined in rank order, and the
    running buffers updated with the joint batch's unbiased variance. Its autograd sums the statistics'
    gradients over the group (torch.distributed.nn), as SyncBatchNorm's backward does."""
    from torch.distributed.nn.functional import all_gather

    C = g.shape[1]
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    gf = g.to(acc)
    n = torch.full((C,), float(g.numel() // max(C, 1)), dtype=acc, device=g.device)
    mean = gf.mean(dim=(0, 2, 3)) if g.numel() else torch.zeros(C, dtype=acc, device=g.device)
    m2 = ((gf - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
    parts = all_gather(torch.stack((n, mean, m2)), group=process_group(group_name))
    count, mean, m2 = parts[0][0], parts[0][1], parts[0][2]
    for p in parts[1:]:  # Chan's formula, in rank order
        nb, mb, m2b = p[0], p[1], p[2]
        total = count + nb
        delta = mb - mean
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta * delta * count * nb / total
        count = total
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_((momentum * mean).to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_((momentum * m2 / (count - 1)).to(running_var.dtype))
    rstd = torch.rsqrt(m2 / count + eps)
    y = (gf - mean[None, :, None, None]) * rstd[None, :, None, None]
    if weight is not None:
        y = y * weight.to(acc)[None, :, None, None]
    if bias is not None:
        y = y + bias.to(acc)[None, :, None, None]
    return y.to(g.dtype)


def batch_norm_reference(g: torch.Tensor, running_mean, running_var, weight, bias, use_batch_stats: bool,
                         momentum: float, eps: float, sync_group: Optional[str] = None) -> torch.Tensor:
    """F.batch_norm, or SyncBatchNorm's joint-batch normalization when ``sync_group`` is set."""
    if sync_group is not None and use_batch_stats:
        return sync_batch_norm_reference(g, running_mean, running_var, weight, bias, momentum, eps, sync_group)
    return F.batch_norm(g, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)


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


# ------------------------------------------------------------ statistics formats

MEAN, RSTD, COUNT, M2, SCALE, SHIFT = range(6)
STATS_ROWS = 4  # MEAN, RSTD, COUNT, M2: the ``stats`` output of every block's forward op


def tile_partials_reference(g: torch.Tensor, tiles: int = 1) -> torch.Tensor:
    """Partials ``[3, T, C]`` (count, mean, M2) of ``g`` [N, C, H, W], splitting N*H*W into ``tiles`` chunks.

    A reference for what a statistics epilogue emits; used by tests of ``finalize``.
    """
    C = g.shape[1]
    flat = g.transpose(0, 1).reshape(C, -1)
    flat = flat if flat.dtype == torch.float64 else flat.float()  # float64 accumulates in float64
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


def combine_reference(partials: torch.Tensor) -> torch.Tensor:
    """[3, T, C] -> [3, C]: tiles combined in index order with Chan's formula."""
    count, mean, m2 = partials[0, 0].clone(), partials[1, 0].clone(), partials[2, 0].clone()
    for i in range(1, partials.shape[1]):
        nb, mb, m2b = partials[0, i], partials[1, i], partials[2, i]
        n = count + nb
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        delta = mb - mean
        mean = mean + delta * nb / safe_n
        m2 = m2 + m2b + delta * delta * count * nb / safe_n
        count = n
    return torch.stack((count, mean, m2))


def finalized_from_combined(combined: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            eps: float) -> torch.Tensor:
    """[3, C] (count, mean, M2) -> the finalized [6, C] statistics (biased variance, as BatchNorm normalizes)."""
    count, mean, m2 = combined[0], combined[1], combined[2]
    rstd = torch.rsqrt(m2 / count + eps)
    scale, shift = affine(mean, rstd, weight, bias)
    return torch.stack((mean, rstd, count, m2, scale, shift))


def finalize_reference(partials: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> torch.Tensor:
    """Partials [3, T, C] -> finalized [6, C]: what every backend's ``finalize`` computes."""
    return finalized_from_combined(combine_reference(partials), weight, bias, eps)


def finalized_from_running(running_mean: torch.Tensor, running_var: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Eval: the finalized [6, C] statistics from the running buffers (COUNT and M2 zero)."""
    mean = running_mean.float()
    rstd = torch.rsqrt(running_var.float() + eps)
    scale, shift = affine(mean, rstd, weight, bias)
    zero = torch.zeros_like(mean)
    return torch.stack((mean, rstd, zero, zero, scale, shift))


def affine(mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """(s, t) with BN(g) = g * s + t: s = gamma * rstd, t = beta - mean * s."""
    scale = rstd if weight is None else weight.float() * rstd
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    return scale, shift


def update_running_stats(call: BatchNormCall, stats: torch.Tensor) -> None:
    """The one running-buffer update, for every backend: r = (1 - m) r + m * batch, in the buffers' own
    dtype, with the unbiased variance, exactly as F.batch_norm does. ``stats`` is a forward op's [4, C]."""
    if call.running_mean is None or not call.use_batch_stats:
        return
    m = call.momentum
    mean, count, m2 = stats[MEAN], stats[COUNT], stats[M2]
    with torch.no_grad():
        call.running_mean.mul_(1 - m).add_((m * mean).to(call.running_mean.dtype))
        call.running_var.mul_(1 - m).add_((m * (m2 / (count - 1))).to(call.running_var.dtype))


class _SavedAfterUpdate(torch.autograd.Function):
    """Identity that saves the statistics once more, after the running-buffer update.

    Non-reentrant activation checkpointing stops recomputing a region as soon as every tensor it
    saved has been regenerated. The fused op saves its tensors before ``update_running_stats``
    runs, so without a save after the update the recompute would skip the second update that the
    reference (whose BatchNorm updates, then saves) makes. Nothing is copied.
    """

    @staticmethod
    def forward(ctx, y, stats):
        ctx.save_for_backward(stats)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def saved_after_update(y: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return _SavedAfterUpdate.apply(y, stats)


def batch_statistics(kernels, partials: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float, sync_group: Optional[str]) -> torch.Tensor:
    """A backend's ``finalize`` of its partials -> finalized [6, C]; under SyncBatchNorm, every rank's
    statistics gathered and finalized again in rank order: the joint batch's."""
    stats = kernels.finalize(partials, weight, bias, eps)
    if sync_group:
        stats = kernels.finalize(gather_partials(stats, sync_group), weight, bias, eps)
    return stats


def backward_coefficients(sums: Optional[torch.Tensor], stats: torch.Tensor, weight: Optional[torch.Tensor],
                          use_batch_stats: bool, sync_group: Optional[str] = None) -> torch.Tensor:
    """Per-channel [4, C] (k1, k2, mean_dy, mean) with BatchNorm's backward folded in:
    dL/dg = k1 * (dy - mean_dy) + k2 * (g - mean), where g = act(pre-activation).

    Training (batch statistics): k1 = gamma * rstd, k2 = -k1 * rstd * sum(dy * xhat) / M,
    mean_dy = sum(dy) / M (``sums`` = [2, C] (sum dy, sum dy * xhat) over the batch of ``stats[COUNT]`` = M
    elements, the joint batch under SyncBatchNorm); dy - mean_dy is taken first,
    as PyTorch does: it cancels, and a separately rounded k1 * mean_dy would lose the low bits of
    the bias gradient. Eval: k2 = mean_dy = 0. Under SyncBatchNorm (``sync_group``) the sums are
    all-reduced over the group first.
    """
    mean, rstd, count = stats[MEAN], stats[RSTD], stats[COUNT]
    k1 = rstd if weight is None else weight.float() * rstd
    if use_batch_stats and sync_group:  # the joint batch's sums (dgamma, dbeta stay each rank's: DDP sums them)
        sums = sum_across(sums, sync_group)
    if use_batch_stats:
        k2 = -k1 * rstd * (sums[1] / count)
        mean_dy = sums[0] / count
    else:
        k2 = mean_dy = torch.zeros_like(k1)
    return torch.stack((k1, k2, mean_dy, mean))
