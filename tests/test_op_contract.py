"""The op contract, once for every registered fused backend: each block kind's two torch.library ops
(schema, fake, autograd registration via opcheck) and torch.compile(fullgraph=True) through them.

Backends: "triton" (the interpreter on CPU, or CUDA) and "cuda" (the CPU emulator of the csrc/
kernels, or the real extension on a GPU); each is skipped with the reason where it cannot run.
"""
import functools
import importlib.util
import os

import pytest
import torch

from convmixer_kernels import _cuda_ext, backends
from convmixer_kernels.ops import depthwise_block as D
from convmixer_kernels.ops import pointwise_block as P
from convmixer_kernels.ops.activation import ACT_CODE
from harness import DEVICE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT_CASES = [(op, b) for op in ("depthwise_block", "pointwise_block") for b in ("triton", "cuda")
                  if b in backends.implemented_backends(op)]


def _emulator():
    spec = importlib.util.spec_from_file_location("cmk_emulator_build", os.path.join(REPO, "csrc", "emulate",
                                                                                     "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emulated_extension():
    build = _emulator()
    reason = build.missing_requirement()
    if reason:
        pytest.skip(f"CPU emulator of the CUDA kernels unavailable: {reason}")
    return build.build()


@pytest.fixture
def device_for(request, monkeypatch):
    """The device each backend's kernels run on in this test session (the emulator counts as CPU)."""
    def get(backend):
        if backend == "cuda" and DEVICE.type == "cpu":
            module = request.getfixturevalue("emulated_extension")
            monkeypatch.setattr(_cuda_ext, "_state", {"tried": True, "module": module, "error": None})
            return torch.device("cpu")
        reason = backends.environment_reason(backend, DEVICE)
        if reason:
            pytest.skip(reason)
        return DEVICE
    return get


def _randn(*shape, seed, device, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


def _args(op, train, device, *, grads=True, affine=True, layout="channels_last", store=None):
    """The forward op's arguments, minus the trailing backend name."""
    C = 5
    x = _randn(2, C, 4, 6, seed=1, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = _randn(C, 1, 3, 3, seed=2, device=device, scale=0.4) if op == "depthwise_block" else \
        _randn(C, C, 1, 1, seed=2, device=device, scale=0.4)
    b, g, beta = (_randn(C, seed=s, device=device, scale=0.3) for s in (3, 4, 5))
    g = g + 1
    rm, rv = _randn(C, seed=6, device=device, scale=0.1), _randn(C, seed=7, device=device).abs() + 0.5
    req = lambda t: t.clone().requires_grad_(grads)  # noqa: E731
    bn = (req(g), req(beta)) if affine else (None, None)
    head = (req(x), req(w), req(b)) + bn + (rm, rv, train, 1e-5, ACT_CODE["gelu"])
    store = grads if store is None else store  # keep the pre-activation for a backward
    return head + ((1, 1, store) if op == "depthwise_block" else (store,))


def _ops(op):
    ns = torch.ops.convmixer_kernels
    return (ns.depthwise_block_fwd, ns.depthwise_block_bwd) if op == "depthwise_block" else \
        (ns.pointwise_block_fwd, ns.pointwise_block_bwd)


@pytest.mark.parametrize("op, backend", CONTRACT_CASES)
@pytest.mark.parametrize("case", ["train", "eval", "train_no_affine", "eval_nchw_no_grad"])
def test_forward_op_passes_opcheck(op, backend, case, device_for):
    device = device_for(backend)
    args = _args(op, case.startswith("train"), device, affine="no_affine" not in case, grads="no_grad" not in case,
                 layout="nchw" if "nchw" in case else "channels_last")
    torch.library.opcheck(_ops(op)[0], args + (backend,))


@pytest.mark.parametrize("op, backend", CONTRACT_CASES)
def test_backward_op_passes_opcheck(op, backend, device_for):
    device = device_for(backend)
    fwd, bwd = _ops(op)
    args = _args(op, True, device, grads=False, store=True)
    y, saved, stats = fwd(*args, backend)
    dy = torch.randn_like(y)
    x, w, g = args[0], args[1], args[3]
    if op == "depthwise_block":
        bargs = (dy, x, saved, w, g, stats, True, ACT_CODE["gelu"], 1, 1, True, True, True, True, backend)
    else:
        bargs = (dy, x, saved, w, g, stats, True, ACT_CODE["gelu"], True, True, True, True, backend)
    torch.library.opcheck(bwd, bargs)


@pytest.mark.parametrize("op, backend", CONTRACT_CASES)
def test_fullgraph_compile_matches_eager(op, backend, device_for):
    """torch.compile(fullgraph=True) traces through the op pair (aot_eager: no code generation on CPU):
    outputs, every gradient and the running buffers as in eager mode."""
    device = device_for(backend)
    torch._dynamo.reset()
    fused = D.depthwise_block_fused if op == "depthwise_block" else P.pointwise_block_fused
    kw = dict(activation="gelu", backend=backend)
    if op == "depthwise_block":
        kw["padding"] = "same"
    block = functools.partial(fused, **kw)
    args = _args(op, True, device, grads=False)
    x, w, b, g, beta, rm, rv = args[:7]

    def run(fn, rm, rv):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, g, beta)]
        y = fn(*leaves, rm, rv, True, 0.1, 1e-5)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    rm_e, rv_e, rm_c, rv_c = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    eager = run(block, rm_e, rv_e)
    compiled = run(torch.compile(block, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor"),
                   rm_c, rv_c)
    for got, want in zip(compiled + [rm_c, rv_c], eager + [rm_e, rv_e]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
