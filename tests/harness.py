"""The harness every backend plugs into.

``backends_under_test(op)`` lists every backend that implements ``op`` and can
run on this machine's test device: "torch" always; "triton" under the
interpreter on CPU or on CUDA; "cuda" where the extension is built and a GPU is
present. Tests parametrize over it, so a new backend is tested by registering it.

Blocks are built as the reference would build them, with random (not default)
parameters and BatchNorm buffers, then copied into fused / reference / float64
versions by ``convmixer_kernels.verify``.
"""
from __future__ import annotations

import copy
from typing import Callable, List

import pytest
import torch
from torch import nn

from convmixer_kernels import backends
from convmixer_kernels.modules import FusedDepthwiseBlock, FusedPointwiseBlock, Residual
from convmixer_kernels.ops.activation import make_activation
from convmixer_kernels.verify import compare_train_then_eval, format_rows, three_copies

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
OPS = ("depthwise_block", "pointwise_block")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]
LAYOUTS = ["nchw", "channels_last"]


def backends_under_test(op: str) -> List[str]:
    return [b for b in backends.BACKENDS
            if b in backends.implemented_backends(op) and backends.environment_reason(b, DEVICE) is None]


def model_backends() -> List[str]:
    """Backends for whole-model tests: those that implement both ops (torch always)."""
    return [b for b in backends_under_test(OPS[0]) if b in backends_under_test(OPS[1])]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and plausible random BatchNorm buffers (never the defaults 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "weight" in name else 0.2)
                    + (1.0 if name.endswith("2.weight") else 0.0))  # BN gamma near 1
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module


def depthwise_reference(dim: int, k: int, activation: str = "gelu", **bn_kwargs) -> nn.Module:
    return Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"),
                                  make_activation(activation), nn.BatchNorm2d(dim, **bn_kwargs)))


def pointwise_reference(dim: int, activation: str = "gelu", out_dim=None, **bn_kwargs) -> nn.Module:
    out_dim = dim if out_dim is None else out_dim
    return nn.Sequential(nn.Conv2d(dim, out_dim, 1), make_activation(activation), nn.BatchNorm2d(out_dim, **bn_kwargs))


def make_block(kind: str, dim: int, activation: str = "gelu", k: int = 5, **bn_kwargs) -> nn.Module:
    ref = depthwise_reference(dim, k, activation, **bn_kwargs) if kind == "depthwise" \
        else pointwise_reference(dim, activation, **bn_kwargs)
    return randomize_(ref)


def fuser(kind: str, backend: str) -> Callable[[nn.Module], nn.Module]:
    cls = FusedDepthwiseBlock if kind == "depthwise" else FusedPointwiseBlock
    return lambda m: cls.from_module(m, backend=backend)


def make_inputs(shape, steps: int, layout: str = "nchw", seed: int = 1, device=DEVICE) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen).to(device) for _ in range(steps)]
    if layout == "channels_last":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return xs


def check_block(kind: str, backend: str, *, dim=6, shape=(2, 6, 7, 9), k=5, activation="gelu",
                dtype=torch.float32, layout="nchw", steps=2, eval_steps=1, autocast=None,
                expect_backend=None, bn_kwargs=None, prepare=None, autocast_input=None):
    """Train ``steps`` steps then eval ``eval_steps`` on fused / reference / float64 copies; assert the rule.

    ``expect_backend`` (default: ``backend``) is what ``last_backend`` must say ran.
    ``prepare(module)`` may change all three copies (e.g. flip flags) before running.
    Under ``autocast`` the inputs are in the autocast dtype unless ``autocast_input`` says otherwise.
    """
    ref = make_block(kind, dim, activation, k, **(bn_kwargs or {}))
    fused, ref_d, ref64 = three_copies(ref, fuser(kind, backend), dtype if autocast is None else torch.float32,
                                       DEVICE)
    if layout == "channels_last":
        for m in (fused, ref_d, ref64):
            m.to(memory_format=torch.channels_last)
    if prepare is not None:
        for m in (fused, ref_d, ref64):
            prepare(m)
    xs = make_inputs(shape, steps + eval_steps, layout)
    # under autocast a block is fed what the layer before it produces: the autocast dtype
    input_dtype = autocast_input or autocast or dtype
    rows = compare_train_then_eval(fused, ref_d, ref64, xs[:steps], xs[steps:], input_dtype, autocast)
    bad = [r for r in rows if not r.ok]
    assert not bad, "fused result outside the precision rule:\n" + format_rows(rows, only_failures=True)
    assert fused.last_backend == (expect_backend or backend), \
        f"expected backend {expect_backend or backend!r} to run, got {fused.last_backend!r}"
    # the output keeps the input's memory format
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None):
        out = fused(xs[0].to(input_dtype))
        ref_out = ref_d(xs[0].to(input_dtype))
    assert out.is_contiguous(memory_format=torch.channels_last) == \
        ref_out.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == ref_out.dtype
    return fused


def parametrize_backends(op: str):
    return pytest.mark.parametrize("backend", backends_under_test(op))


def clone_module(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)
