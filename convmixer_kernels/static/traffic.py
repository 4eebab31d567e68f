"""The eager reference counted the same way: DRAM traffic per op, and saved-for-backward bytes.

* ``count_ops``: a ``TorchDispatchMode`` over a function run on ``meta`` tensors records every
  aten op with the bytes of its distinct tensor inputs and outputs (one read of each input, one
  write of each output; allocations and views move nothing). That is the traffic of an
  unfused execution where every op is one pass over memory (a lower bound for ops that read
  twice, such as BatchNorm's statistics + normalize on the GPU).
* ``saved_bytes``: ``torch.autograd.graph.saved_tensors_hooks`` around a forward: the bytes of
  every distinct activation tensor autograd keeps for the backward (parameters excluded). Meta
  tensors at the full shape give exact byte counts with no compute (and no scaling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "view",
            "_unsafe_view", "alias", "t", "transpose", "permute", "as_strided", "expand", "reshape", "squeeze",
            "unsqueeze", "slice", "select", "_to_copy_noop", "lift_fresh", "split", "unbind", "sym_size",
            "sym_stride", "is_same_size"}


def _key(t: torch.Tensor) -> tuple:
    try:
        sid = t.untyped_storage()._cdata
    except Exception:
        sid = id(t)
    return (sid, t.storage_offset(), tuple(t.shape), t.dtype)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            k = _key(t)
            if k not in seen:
                seen.add(k)
                total += t.numel() * t.element_size()
    return total


@dataclass
class OpCount:
    op: str
    read: int
    written: int


class CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[OpCount] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in FREE_OPS:
            self.ops.append(OpCount(name, _bytes(tree_leaves((args, kwargs or {}))), _bytes(tree_leaves(out))))
        return out


class _Residual(nn.Module):
    """fn(x) + x, as the official ConvMixer's Residual."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


def reference_block(op: str, dim: int, kernel_size: int, activation: str = "gelu") -> nn.Module:
    """The unfused block of design.md section 1 (the reference the fused modules replace)."""
    if op == "dw_block":
        return _Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                                       _activation(activation), nn.BatchNorm2d(dim)))
    return nn.Sequential(nn.Conv2d(dim, dim, 1), _activation(activation), nn.BatchNorm2d(dim))


def _meta_block(op, shape):
    m = reference_block(op, shape.dim, shape.kernel_size, shape.activation).to("meta")
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):  # autocast runs the convs in the activation dtype; BatchNorm stays fp32
            mod.to(shape.dtype)
    fmt = torch.channels_last if shape.channels_last else torch.contiguous_format
    x = torch.empty(shape.batch, shape.dim, shape.size, shape.size, dtype=shape.dtype, device="meta")
    return m, x.contiguous(memory_format=fmt)


def eager_block_traffic(op: str, shape, training: bool = True) -> Dict[str, dict]:
    """{"forward": ..., "backward": ...} bytes and per-op counts of the unfused block on meta tensors."""
    m, x = _meta_block(op, shape)
    m.train(training)
    if training:  # a block input inside a model is not a leaf: no gradient accumulation counted
        x = x.requires_grad_(True).clone()
    out: Dict[str, dict] = {}
    with CountingMode() as fwd:
        y = m(x)
    out["forward"] = _summary(fwd.ops, shape.unit_bytes)
    if training:
        dy = torch.empty_like(y)
        with CountingMode() as bwd:
            y.backward(dy)
        out["backward"] = _summary(bwd.ops, shape.unit_bytes)
    return out


def _summary(ops: List[OpCount], unit: int) -> dict:
    total = sum(o.read + o.written for o in ops)
    return {"bytes": total, "passes": total / unit, "ops": [(o.op, o.read, o.written) for o in ops]}


def saved_bytes(forward: Callable[[], object], exclude: Tuple[torch.Tensor, ...] = ()) -> Tuple[int, int]:
    """(bytes, tensors) autograd saves during ``forward()``; tensors sharing storage with ``exclude`` skipped."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen = {}

    def pack(t):
        try:
            sid = t.untyped_storage()._cdata
        except Exception:
            sid = id(t)
        if sid not in skip:
            seen[_key(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values()), len(seen)


def eager_saved(op: str, shape) -> Tuple[int, int]:
    m, x = _meta_block(op, shape)
    m.train(True)
    x.requires_grad_(True)
    return saved_bytes(lambda: m(x), exclude=tuple(m.parameters()) + tuple(m.buffers()))


# Which counted op carries which arithmetic: the convolutions (everything else is memory-bound elementwise work).
def _conv_work(op: str, block: str, shape) -> Tuple[float, str]:
    """(flops, unit) of one eager conv op: 1x1 convs are GEMMs on tensor cores; the depthwise conv runs on fp32
    FMA units in eager PyTorch (cuDNN's depthwise path and the native kernel use no tensor cores)."""
    pixels = shape.batch * shape.size * shape.size
    if block == "pw_block":
        gemm = 2.0 * pixels * shape.dim * shape.dim
        return (gemm if op == "convolution" else 2 * gemm), "tensor"  # backward: dx and dW
    fma = 2.0 * pixels * shape.dim * shape.kernel_size ** 2
    return (fma if op == "convolution" else 2 * fma), "fma"


def eager_roofline(eager: Dict[str, Dict[str, dict]], shape, ceilings) -> Dict[str, Dict[str, float]]:
    """Eager's block phases at their roofline, in us: every counted op at max(its bytes / DRAM bandwidth, its
    arithmetic at the ceiling of the units it runs on). A lower bound on any eager run of these ops (real kernels
    are slower, BatchNorm's statistics read their input twice): a speedup measured against it is a lower bound on
    the speedup over eager."""
    out: Dict[str, Dict[str, float]] = {}
    for block, phases in eager.items():
        out[block] = {}
        for phase, v in phases.items():
            total = 0.0
            for op, read, written in v["ops"]:
                t = (read + written) / ceilings.dram_bytes_per_s
                if op in ("convolution", "convolution_backward"):
                    flops, unit = _conv_work(op, block, shape)
                    rate = ceilings.tensor_bf16_flops if unit == "tensor" else ceilings.fma_fp32_flops
                    t = max(t, flops / rate)
                total += t
            out[block][phase] = total * 1e6
    return out
