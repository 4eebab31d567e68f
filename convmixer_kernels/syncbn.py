"""SyncBatchNorm that runs on any device, and the converter that puts it into a model.

``SyncBatchNorm`` is ``nn.SyncBatchNorm`` (same parameters, buffers, ``state_dict`` and
``process_group``) whose training forward normalizes over the process group's joint batch on
CPU (gloo) as well as on GPU, where PyTorch's own refuses CPU tensors. The fused blocks accept
it (and PyTorch's) as their BatchNorm child and do the same inside their kernels: the per-channel
(count, mean, M2) of every rank gathered with one all-gather of a fixed-size buffer and combined
in rank order, the backward's two per-channel sums with one all-reduce, no host synchronization
(ops/batchnorm.py). Gradients of gamma and beta stay each rank's own, as with nn.SyncBatchNorm:
DistributedDataParallel reduces them.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import batchnorm


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the process group's joint batch (see the module docstring); ``process_group`` None
    means the whole world. It is an nn.BatchNorm2d, not an nn.SyncBatchNorm, because
    DistributedDataParallel refuses nn.SyncBatchNorm layers in CPU modules; the state_dict is
    BatchNorm2d's."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        call = batchnorm.batchnorm_call(self)
        batchnorm.check_batchnorm_call(input.shape, call)
        return batchnorm.batch_norm_reference(input, call.running_mean, call.running_var, call.weight, call.bias,
                                              call.use_batch_stats, call.momentum, call.eps, call.sync_group)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, process_group=None) -> "SyncBatchNorm":
        """A SyncBatchNorm sharing ``bn``'s parameters and buffers (nothing is copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(new, name, getattr(bn, name))
        new.weight, new.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(bn, name))
        new.process_group = process_group if process_group is not None else getattr(bn, "process_group", None)
        return new.train(bn.training)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every 2-D BatchNorm layer of ``module`` (nn.BatchNorm2d or nn.SyncBatchNorm, fused blocks' children
    included) becomes a SyncBatchNorm over ``process_group`` (default: the whole world), sharing its
    parameters and buffers: state_dict keys and values do not change. Returns the (possibly new) module."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(module, SyncBatchNorm):
        return SyncBatchNorm.from_batchnorm(module, process_group)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
