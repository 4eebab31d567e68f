"""The one path every fused-block call takes: checks, autocast, backend choice, call.

Both blocks share it, so BatchNorm errors, autocast casting and fallback rules
are the same for each op and each backend.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import backends
from .batchnorm import BatchNormCall, check_batchnorm_call


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference conv runs in: the autocast dtype when autocast is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def reference_only_reason(x: torch.Tensor, weight: torch.Tensor, bn: BatchNormCall, cdtype) -> Optional[str]:
    """Calls no fused backend takes, whatever was requested: the reference raises or handles them.

    Mismatched dtypes or devices make the reference raise its own error; the fused
    backends would otherwise have to re-create every such message.
    """
    autocast = cdtype != x.dtype or torch.is_autocast_enabled(x.device.type)
    if not autocast and x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the weight dtype {weight.dtype}"
    for t in (weight, bn.weight, bn.running_mean):
        if t is not None and t.device != x.device:
            return f"input is on {x.device} but a parameter or buffer is on {t.device}"
    return None


def _verdict_key(op: str, requested: str, x: torch.Tensor, weight: torch.Tensor, bias, bn: BatchNormCall, cdtype,
                 kwargs: dict) -> tuple:
    """Everything a backend verdict depends on, except what is checked on every call anyway.
    Parameters follow the module (``.to()`` moves them together), so the weight's and the BatchNorm
    weight's device and dtype stand for them; a mismatch among them still reaches the reference."""
    bn_w = bn.weight if bn.weight is not None else bn.running_mean
    return (op, requested, backends.strict(), x.device, x.dtype, cdtype, x.shape, x.stride(), weight.device,
            weight.dtype, weight.shape, bias is None, None if bn_w is None else (bn_w.device, bn_w.dtype),
            bn.weight is None, bn.running_mean is None, bn.use_batch_stats, bn.sync_group, torch.is_grad_enabled(),
            torch.is_autocast_enabled(x.device.type), *kwargs.values())


def run_block(op: str, x: torch.Tensor, weight: torch.Tensor, bias, bn: BatchNormCall, backend: str,
              verdicts: Optional[dict] = None, on_start: Optional[Callable[[], None]] = None,
              **kwargs) -> Tuple[torch.Tensor, str]:
    """Run one fused block; return (output, name of the backend that ran it).

    Every backend of ``op`` shares the reference's signature:
    ``fn(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum,
    eps, **kwargs)``. The reference runs with autocast as the caller set it (so it *is* the unfused
    model); a fused backend gets x, weight and bias already cast to the autocast dtype and runs
    with autocast off, the BatchNorm parameters and buffers staying in their own (float32) dtype.

    The backend verdict is cached in ``verdicts`` (a module's dict) per device, dtypes, shapes,
    strides, training and grad mode; the checks that raise (BatchNorm's) run on every call.
    ``on_start`` (the module's batch count) runs once the backend is chosen, before those checks:
    the reference counts the batch and then raises the same errors.
    """
    cdtype = compute_dtype(x)
    requested = backends.requested_backend(backend)
    key = _verdict_key(op, requested, x, weight, bias, bn, cdtype, kwargs) if verdicts is not None else None
    name = verdicts.get(key) if key is not None else None
    if name is None:
        reason = reference_only_reason(x, weight, bn, cdtype)
        if reason is not None:
            name = "torch"
        else:
            name = backends.choose_backend(op, requested, x.device, x=x, weight=weight, bn=bn,
                                           compute_dtype=cdtype, **kwargs)
        if key is not None:
            verdicts[key] = name
    if on_start is not None:
        on_start()
    check_batchnorm_call(x.shape, bn)
    fn = backends.implementation(op, name)
    args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.use_batch_stats, bn.momentum, bn.eps)
    kwargs = dict(kwargs, sync_group=bn.sync_group)
    if name == "torch":
        return fn(x, weight, bias, *args, **kwargs), name
    # a named range, so profiler traces show which fused op is which
    with torch.profiler.record_function(f"convmixer_kernels::{op}[{name}]"):
        if torch.is_autocast_enabled(x.device.type):
            x, weight = x.to(cdtype), weight.to(cdtype)
            bias = None if bias is None else bias.to(cdtype)
            with torch.autocast(x.device.type, enabled=False):
                return fn(x, weight, bias, *args, **kwargs), name
        return fn(x, weight, bias, *args, **kwargs), name


def common_unsupported(x: torch.Tensor, compute_dtype, *, residual: bool,
                       dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> Optional[str]:
    """Reasons shared by the fused backends of both blocks (each may add its own)."""
    if compute_dtype not in dtypes:
        return f"dtype {compute_dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    if residual and x.dtype != compute_dtype:
        return (f"under autocast the input dtype {x.dtype} differs from the autocast dtype {compute_dtype}, "
                "and the residual add needs the input in its own precision")
    return None


def on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (both ops' bodies run under it)."""
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def refuse_double_backward(op: str, backend: str, grad: torch.Tensor) -> None:
    """The fused backward ops have no autograd formula of their own: a create_graph=True backward gets
    a clear error naming the fix (torch.compile tracing its backward is not one: fake/functional tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and \
            not isinstance(grad, (FakeTensor, FunctionalTensor)):
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported on the {backend!r} "
                           "backend; run this block with backend='torch' for higher-order gradients")
