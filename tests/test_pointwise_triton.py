"""Triton backend of the pointwise block: the GEMM alone, the torch.library ops, torch.compile,
determinism, poisoned outputs, Cout != Cin, NCHW read in place; CUDA-only tests at the paper's shapes.

The block grid (dtypes, activations, layouts, BatchNorm configurations, edge cases) is in
test_blocks.py; these are the triton-specific checks. Interpreted shapes stay tiny.
"""
import copy
import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convmixer_kernels import FusedPointwiseBlock, backends
from convmixer_kernels.ops import batchnorm as bnops
from convmixer_kernels.ops import pointwise_block as pw
from convmixer_kernels.ops.triton import common as TC
from convmixer_kernels.ops.triton import pointwise as TP
from convmixer_kernels.ops.activation import ACT_CODE, activation_reference
from convmixer_kernels.ops.alloc import poisoning
from convmixer_kernels.ops.batchnorm import BatchNormCall
from convmixer_kernels.verify import compare, compare_train_then_eval, format_rows, three_copies
from harness import DEVICE, ON_GPU, make_inputs, pointwise_reference, randomize_

pytestmark = pytest.mark.skipif(backends.environment_reason("triton", DEVICE) is not None,
                                reason=f"triton cannot run here: {backends.environment_reason('triton', DEVICE)}")
TRITON = functools.partial(pw.pointwise_block_fused, backend="triton")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (paper-sized shapes are too slow for the "
                                                 "Triton interpreter on CPU)")


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _matmul(a, b, c_dtype=None, **kw):
    """C = A @ B through ``pw.gemm`` with row-major A [I, K], B [K, J], C [I, J]."""
    I, K = a.shape
    J = b.shape[1]
    c = torch.full((I, J), float("nan"), dtype=c_dtype or a.dtype, device=a.device)
    part = TP.gemm(a, TP._linear(a.stride(0)), a.stride(1), b, TP._linear(b.stride(0)), b.stride(1),
                   c, TP._linear(c.stride(0)), c.stride(1), I, J, K, **kw)
    return c, part


# ---------------------------------------------------------------- the GEMM alone

GEMM_SHAPES = [(1, 1, 1), (3, 17, 33), (33, 3, 17), (17, 33, 1), (40, 18, 35)]


@pytest.mark.parametrize("I,J,K", GEMM_SHAPES, ids=str)
def test_gemm_float32_matches_float64_matmul(I, J, K):
    a, b = _randn(I, K, seed=1), _randn(K, J, seed=2)
    c, _ = _matmul(a, b)
    ref = a.double() @ b.double()
    assert _rel(c, ref) <= 1e-6, _rel(c, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("I,J,K", [(3, 17, 33), (40, 18, 35)], ids=str)
def test_gemm_half_types_within_the_rule(dtype, I, J, K):
    """bf16 included: the interpreter's bf16 tl.dot returns garbage unless the kernel upcasts (gpu.md)."""
    a, b = _randn(I, K, dtype=dtype, seed=3), _randn(K, J, dtype=dtype, seed=4)
    c, _ = _matmul(a, b)
    ref = a.double() @ b.double()  # exact products of the rounded inputs
    row = compare("gemm", c, torch.matmul(a, b), ref, dtype)
    assert row.ok, format_rows([row])
    assert _rel(c, ref) < 1e-2  # a garbage dot is off by orders of magnitude, not a rounding


def test_gemm_strided_operands_and_pixel_axes():
    """A read as NCHW [N, K, H, W] through its strides, B transposed, C written NCHW: no copies."""
    x = _randn(2, 7, 3, 5, seed=5)  # M = 30 pixels, K = 7 channels
    w = _randn(9, 7, seed=6)  # B[k, j] = w[j, k]
    out = torch.full((2, 9, 3, 5), float("nan"), device=DEVICE)
    TP.gemm(x, TP._pixels(x), x.stride(1), w, TP._linear(w.stride(1)), w.stride(0),
            out, TP._pixels(out), out.stride(1), 30, 9, 7)
    ref = torch.einsum("nkhw,jk->njhw", x.double(), w.double())
    assert _rel(out, ref) <= 1e-6
    # an arbitrary strided view needs all three pixel dims
    big = _randn(3, 7, 8, 11, seed=7)
    v = big[::2, :, 1::3, ::2]
    assert TP._pixels(v).dims == 3
    out = torch.full((2, 9, 3, 6), float("nan"), device=DEVICE)
    TP.gemm(v, TP._pixels(v), v.stride(1), w, TP._linear(w.stride(1)), w.stride(0),
            out, TP._pixels(out), out.stride(1), 36, 9, 7)
    assert _rel(out, torch.einsum("nkhw,jk->njhw", v.double(), w.double())) <= 1e-6


def test_pixel_axis_merges_contiguous_dims():
    x = torch.empty(2, 6, 5, 7)
    assert TP._pixels(x) == TP._Axis(2, 1, 35, 0, 6 * 35, 1)  # (N, H*W)
    assert TP._pixels(x.contiguous(memory_format=torch.channels_last)) == TP._linear(6)  # one dim, stride C
    assert TP._pixels(torch.empty(1, 6, 1, 1)).dims == 1


def test_gemm_prologue_split_k_and_statistics_epilogue():
    """The pieces the whole-layer fusion (design.md 3.3) will use: A' = act(A)*s + t + res on load,
    split-K with the fixed-order reduction, and the statistics epilogue's [3, T, J] partials."""
    I, J, K = 37, 19, 150
    a, b, res = _randn(I, K, seed=8), _randn(K, J, seed=9), _randn(I, K, seed=10)
    s, t, bias = _randn(K, seed=11), _randn(K, seed=12), _randn(J, seed=13)
    a_eff = activation_reference(a.double(), "gelu_tanh") * s.double() + t.double() + res.double()
    pro = dict(act=ACT_CODE["gelu_tanh"], scale=s, shift=t, residual=res)
    c, _ = _matmul(a, b, prologue=pro)
    assert _rel(c, a_eff @ b.double()) <= 1e-5
    # split-K: partial products per split, summed in order
    parts = torch.full((3, I, J), float("nan"), device=DEVICE)
    TP.gemm(a, TP._linear(K), 1, b, TP._linear(J), 1, parts, TP._linear(J), 1, I, J, K,
            prologue=pro, split_k=3, stride_csplit=I * J)
    summed = TC.sum_rows(parts).view(I, J)
    assert _rel(summed, a_eff @ b.double()) <= 1e-5
    # statistics epilogue: p = A B + bias stored; per row tile (count, mean, M2) of act(p)
    cfg = TP.GemmConfig(16, 16, 16, 2, 4, 1)  # known row tiles: 16, 16, 5
    c, part = _matmul(a, b, bias=bias, stats=True, act=ACT_CODE["relu"], config=cfg)
    assert _rel(c, a.double() @ b.double() + bias.double()) <= 1e-6
    assert part.shape == (3, 3, J)
    for i, r in enumerate(torch.split(torch.relu(c.double()), 16)):
        torch.testing.assert_close(part[0, i].double(), torch.full_like(r[0], r.shape[0]))
        torch.testing.assert_close(part[1, i].double(), r.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part[2, i].double(), ((r - r.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("epi_split", [1, 2, 4])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_split_epilogues_match_the_one_piece_epilogue(epi_split, act):
    """The epilogue in EPI_SPLIT column blocks (what sm_90 runs: statistics in 4, BN apply in 2) writes
    exactly what the one-piece epilogue writes: C, its statistics partials, and the applied output.
    Ragged rows (I = 37) and columns (J = 53) on 32-wide tiles: every block meets the masks."""
    I, J, K = 37, 53, 40
    a, b, bias = _randn(I, K, seed=70), _randn(K, J, seed=71), _randn(J, seed=72)
    s, t = _randn(J, seed=73), _randn(J, seed=74)
    code = ACT_CODE[act]
    cfg = TP.GemmConfig(32, 32, 16, 2, 4, 1, epi_split=epi_split)
    one = TP.GemmConfig(32, 32, 16, 2, 4, 1)
    c, part = _matmul(a, b, bias=bias, stats=True, act=code, config=cfg)
    c1, part1 = _matmul(a, b, bias=bias, stats=True, act=code, config=one)
    assert torch.equal(c, c1) and torch.equal(part, part1)
    assert _rel(c, a.double() @ b.double() + bias.double()) <= 1e-6
    g = activation_reference(c.double(), act)
    rows = torch.split(g, 32)
    torch.testing.assert_close(part[0].double(), torch.tensor([[r.shape[0]] * J for r in rows], dtype=torch.float64))
    torch.testing.assert_close(part[1].double(), torch.stack([r.mean(0) for r in rows]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part[2].double(), torch.stack([((r - r.mean(0)) ** 2).sum(0) for r in rows]),
                               rtol=1e-5, atol=1e-5)
    z, _ = _matmul(a, b, bias=bias, apply=(s, t), act=code, config=cfg)
    z1, _ = _matmul(a, b, bias=bias, apply=(s, t), act=code, config=one)
    assert torch.equal(z, z1)
    assert _rel(z, g * s.double() + t.double()) <= 1e-5


def test_default_configs_per_epilogue():
    """One place chooses the sm_90 configuration: 128x128x64, 8 warps, 3 stages; epilogues capped at 128
    registers (2 blocks per SM) and split in column blocks."""
    bf16 = torch.bfloat16
    assert TP.default_config(bf16, True, False) == TP.GemmConfig(128, 128, 64, 8, 8, 3, maxnreg=128, epi_split=4)
    assert TP.default_config(bf16, False, True) == TP.GemmConfig(128, 128, 64, 8, 8, 3, maxnreg=128, epi_split=2)
    assert TP.default_config(bf16, False, False) == TP.GemmConfig(128, 128, 64, 8, 8, 3)
    assert TP.default_config(torch.float32, True, False).block_k == 32
    assert TP.GemmConfig(16, 16, 16, maxnreg=128).meta()["maxnreg"] == 128
    assert "maxnreg" not in TP.GemmConfig(16, 16, 16).meta()


def test_weight_gradient_split_k_fills_waves():
    """dW = dp^T r at the paper shape (1536 x 1536, K = M = 65536, 264 slots on an H200): 9 splits,
    1296 blocks = 4.9 waves (2 splits were 288 blocks, 1.09 waves); small K: no split; splits are
    whole multiples of 64 and cover K."""
    cfg = TP.default_config(torch.bfloat16, False, False)
    assert TP.split_k_for(1536, 1536, 65536, cfg, 264, 64) == 9
    assert TP.split_k_for(1536, 1536, 1024, cfg, 264, 1) == 1
    for I, J, K in [(1536, 1536, 65536), (768, 768, 65536), (256, 256, 16384), (1024, 1024, 16384)]:
        split = TP.split_k_for(I, J, K, cfg, 264, 64)
        kps, n = TP.split_plan(K, split)
        assert n == split and kps % 64 == 0 and (n - 1) * kps < K <= n * kps
        tiles = -(-I // 128) * -(-J // 128)
        waves = tiles * split / 264
        # one (partial) wave of short blocks, or whole waves at least 90% full
        assert tiles * split <= 264 or waves >= 0.9 * -(-tiles * split // 264), (I, J, K, split, waves)
    with TC.static_target():
        assert TP._gemm_slots(torch.device("meta"), cfg, 2) == 264
        assert TP._split_k(1536, 1536, 65536, torch.bfloat16, torch.device("meta")) == 9


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_bn_backward_act_both_matches_separate_functions(act):
    """The dp pass evaluates act and act' from one erf/tanh: its dp equals the float64 formula."""
    M, C = 37, 19
    p = _randn(M, C, seed=80) * 2
    dz = _randn(M, C, seed=81)
    k1, k2, mdy, mean = (_randn(C, seed=82 + i) for i in range(4))
    coef = torch.stack((k1, k2, mdy, mean))
    x = p.t().reshape(1, C, M, 1).contiguous()  # shapes only; not read by the dp pass
    w = _randn(C, C, 1, 1, seed=90)
    dz4 = dz.t().reshape(1, C, M, 1).contiguous(memory_format=torch.channels_last)
    assert dz4.is_contiguous(memory_format=torch.channels_last)
    _, _, db = TP.input_grad(dz4, p, x.contiguous(memory_format=torch.channels_last), w, coef, ACT_CODE[act], True,
                             False, False, True)
    pd = p.double()
    g = activation_reference(pd, act)
    pr = pd.clone().requires_grad_(True)
    activation_reference(pr, act).sum().backward()
    dp = pr.grad * (k1.double() * (dz.double() - mdy.double()) + k2.double() * (g - mean.double()))
    assert _rel(db, dp.sum(0)) <= 1e-5


def test_gemm_operand_dtype_mismatch_raises():
    a, b = _randn(4, 4), _randn(4, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        _matmul(a, b)


# ---------------------------------------------------------------- the block's triton specifics

def _run_block(module, x):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    w = _randn(*out.shape, seed=99).to(out.dtype)
    (out * w).sum().backward()
    module = getattr(module, "_orig_mod", module)  # a compiled module's parameters live there
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    bufs = {n: b.clone() for n, b in module.named_buffers()}
    return out.detach(), x.grad, grads, bufs


@pytest.mark.parametrize("out_dim", [3, 11])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_out_channels_differ_from_in_channels(out_dim, layout):
    ref = randomize_(pointwise_reference(6, "gelu", out_dim=out_dim))
    fused, ref_d, ref64 = three_copies(ref, lambda m: FusedPointwiseBlock.from_module(m, backend="triton"),
                                       torch.float32, DEVICE)
    xs = make_inputs((2, 6, 5, 7), 3, layout)
    rows = compare_train_then_eval(fused, ref_d, ref64, xs[:2], xs[2:], torch.float32)
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    assert fused.last_backend == "triton"


def test_forward_backward_is_bitwise_deterministic():
    block = FusedPointwiseBlock.from_module(randomize_(pointwise_reference(6, "gelu_tanh")), backend="triton")
    block.to(DEVICE)
    x = _randn(2, 6, 7, 5, seed=20)
    first, second = copy.deepcopy(block), copy.deepcopy(block)
    r1, r2 = _run_block(first, x), _run_block(second, x)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    for d1, d2 in ((r1[2], r2[2]), (r1[3], r2[3])):
        for name in d1:
            assert torch.equal(d1[name], d2[name]), name


def test_poisoned_outputs_are_fully_written():
    """Outputs start as NaN (CONVMIXER_KERNELS_POISON); tiles that do not divide the sizes must still
    write every element, forward and backward, in both layouts and in eval."""
    assert poisoning(), "tests/conftest.py should set CONVMIXER_KERNELS_POISON=1"
    for layout in ("nchw", "channels_last"):
        for train in (True, False):
            block = FusedPointwiseBlock.from_module(randomize_(pointwise_reference(5, "relu", out_dim=17)),
                                                    backend="triton").to(DEVICE).train(train)
            x = make_inputs((2, 5, 3, 7), 1, layout)[0]
            out, gx, grads, bufs = _run_block(block, x)
            for name, t in [("output", out), ("grad_input", gx), *grads.items(), *bufs.items()]:
                assert torch.isfinite(t.float()).all(), f"{layout} train={train}: {name} has unwritten elements"
            with torch.no_grad():  # the single-kernel inference path
                assert torch.isfinite(block(x)).all()


class _CopyDetector(TorchDispatchMode):
    """Records aten ops that read a watched tensor's storage and produce a new tensor at least as large."""

    def __init__(self, watched):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in watched}
        self.numel = min(t.numel() for t in watched)
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        reads = [a for a in flat_in if a.untyped_storage().data_ptr() in self.ptrs]
        outs = out if isinstance(out, (tuple, list)) else [out]
        if str(func).startswith("aten.copy_"):  # copy_(dst, src): a copy when src is watched and dst is not
            reads = [a for a in flat_in[1:] if a.untyped_storage().data_ptr() in self.ptrs]
            outs = [flat_in[0]]
        for o in outs:
            if (reads and isinstance(o, torch.Tensor) and o.numel() >= self.numel
                    and o.untyped_storage().data_ptr() not in self.ptrs):
                self.copies.append(str(func))
        return out


def _forward(x, w, b, call, activation):
    """The contract's forward launchers, composed as the op composes them."""
    act = ACT_CODE[activation]
    p, part = TP.linear(x, w, b, act, True)
    stats = TP.finalize(part, call.weight, call.bias, call.eps)
    return TP.apply(p, x, stats, act), p, stats


def _backward(dz, x, w, p, stats, activation):
    act = ACT_CODE[activation]
    sums = TP.grad_sums(dz, p, stats, act)
    coef = bnops.backward_coefficients(sums, stats, None, True)
    return TP.input_grad(dz, p, x, w, coef, act, True, True, True, True)


def test_nchw_is_read_in_place_without_copies():
    x = _randn(2, 6, 5, 7, seed=30)  # NCHW
    w = _randn(4, 6, 1, 1, seed=31)
    b = _randn(4, seed=32)
    call = BatchNormCall(None, None, None, None, True, 0.1, 1e-5)
    # the detector sees a real copy
    with _CopyDetector([x]) as det:
        x.contiguous(memory_format=torch.channels_last)
    assert det.copies
    with _CopyDetector([x]) as det:
        z, p, stats = _forward(x, w, b, call, "gelu")
    assert not det.copies, det.copies
    dz = torch.ones(1, device=DEVICE).expand(z.shape)  # what z.sum().backward() sends: all strides 0
    with _CopyDetector([x, dz]) as det:
        dx, dw, db = _backward(dz, x, w, p, stats, "gelu")
    assert not det.copies, det.copies
    assert z.is_contiguous() and dx.is_contiguous()  # NCHW in, NCHW out
    # and the results are those of the channels_last copy
    xc = x.contiguous(memory_format=torch.channels_last)
    z2, p2, stats2 = _forward(xc, w, b, call, "gelu")
    dx2, dw2, _ = _backward(dz.contiguous(), xc, w, p2, stats2, "gelu")
    assert z2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, z2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, dw2, rtol=1e-6, atol=1e-6)


def _block_args():
    x = _randn(2, 5, 3, 4, seed=40)
    w = _randn(6, 5, 1, 1, seed=41)
    b, g, beta = (_randn(6, seed=s) for s in (42, 43, 44))
    rm, rv = _randn(6, seed=45) * 0.1, _randn(6, seed=46).abs() + 0.5
    return [x, w, b, g, beta, rm, rv]


def test_running_buffers_updated_in_place_and_in_their_dtype():
    args = _block_args()
    rm, rv = args[5].half(), args[6].half()
    rm0, rv0 = rm.clone(), rv.clone()
    TRITON(*args[:5], rm, rv, True, 0.3, 1e-5, activation="gelu")
    assert rm.dtype == rv.dtype == torch.float16
    x, w, b, g, beta = (t.double() for t in args[:5])
    rm64, rv64 = rm0.double(), rv0.double()
    pw.pointwise_block_reference(x, w, b, g, beta, rm64, rv64, True, 0.3, 1e-5, activation="gelu")
    torch.testing.assert_close(rm.double(), rm64, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rv.double(), rv64, rtol=2e-3, atol=2e-3)
    assert not torch.equal(rm, rm0)


def test_bad_inputs_raise_with_shapes_in_the_message():
    x, w, b = _randn(2, 5, 3, 3), _randn(4, 6, 1, 1), _randn(4)
    with pytest.raises(RuntimeError, match=r"\(2, 5, 3, 3\).*5 channels.*\(4, 6, 1, 1\)"):
        TRITON(x, w, b, None, None, None, None, True, 0.1, 1e-5, activation="gelu")
    with pytest.raises(RuntimeError, match="bias is torch.float16"):
        TRITON(x, _randn(4, 5, 1, 1), b.half(), None, None, None, None, True, 0.1, 1e-5,
                                  activation="gelu")


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces through the custom ops, forward and backward
    (aot_eager on CPU: no code generation needed; Inductor on CUDA)."""
    block = FusedPointwiseBlock.from_module(randomize_(pointwise_reference(6, "gelu")), backend="triton")
    block.to(DEVICE)
    eager = copy.deepcopy(block)
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True,
                             backend="inductor" if ON_GPU else "aot_eager")
    x = _randn(2, 6, 5, 4, seed=50)
    for train in (True, False):
        eager.train(train)
        compiled.train(train)
        r_e, r_c = _run_block(eager, x), _run_block(compiled, x)
        torch.testing.assert_close(r_c[0], r_e[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_c[1], r_e[1], rtol=1e-5, atol=1e-5)
        for d_c, d_e in ((r_c[2], r_e[2]), (r_c[3], r_e[3])):
            for name in d_e:
                torch.testing.assert_close(d_c[name], d_e[name], rtol=1e-5, atol=1e-5, msg=name)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)


_COMPILE_FOR_SM90 = r"""
from triton.backends.compiler import GPUTarget
import torch
from triton.compiler import ASTSource, compile
from convmixer_kernels.ops.triton import pointwise as P

def build(fn, ptrs, consts, options=None):
    sig, cx = {}, {}
    for name in fn.arg_names:
        if name in consts:
            sig[name], cx[name] = "constexpr", consts[name]
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32")
        else:
            sig[name] = "i32"
    k = compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32), options=options or {})
    return k

gemm_base = dict(A_DIMS=1, B_DIMS=1, C_DIMS=3, PRO_ACT=-1, PRO_AFFINE=False, HAS_RES=False, HAS_BIAS=True,
                 PRO_B=False, RES_DIMS=0, RES_ACT=-1, RES_AFFINE=False,
                 DOT_F32=False, PRECISION="tf32", GROUP_I=8)
for dt, stats, apply, act in [("*bf16", True, False, 0), ("*fp16", True, False, 1), ("*bf16", False, True, 1),
                              ("*bf16", False, False, 2)]:
    ops = dict(a_ptr=dt, b_ptr=dt, c_ptr=dt, bias_ptr=dt, res_ptr=dt)
    cfg = P.default_config({"*bf16": torch.bfloat16, "*fp16": torch.float16}[dt], stats, apply)
    meta = cfg.meta()
    opts = {k: meta.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in meta}
    k = build(P._gemm_kernel, ops, dict(gemm_base, STATS=stats, APPLY=apply, ACT=act, EPI_SPLIT=cfg.epi_split,
                                        **meta), opts)
    assert "wgmma" in k.asm["ptx"], "no wgmma for the sm_90 GEMM"
# the prologue (design.md 3.3) and fp32 operands (tf32 / ieee)
build(P._gemm_kernel, dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32", res_ptr="*bf16"),
      dict(gemm_base, PRO_ACT=0, PRO_AFFINE=True, HAS_RES=True, HAS_BIAS=False, STATS=False, APPLY=False, ACT=0,
           EPI_SPLIT=1, BLOCK_I=128, BLOCK_J=128, BLOCK_K=64), dict(num_warps=8, num_stages=3))
build(P._gemm_kernel, dict(a_ptr="*fp32", b_ptr="*fp32", c_ptr="*fp32", bias_ptr="*fp32"),
      dict(gemm_base, STATS=True, APPLY=False, ACT=0, EPI_SPLIT=4, PRECISION="ieee", BLOCK_I=128, BLOCK_J=128,
           BLOCK_K=32), dict(num_warps=8, num_stages=3, maxnreg=128))
for dt, act, store, train in [("*bf16", 0, False, True), ("*bf16", 0, True, True), ("*bf16", 0, True, False),
                              ("*fp32", 1, True, True), ("*bf16", 2, True, True)]:
    build(P._bn_bwd_kernel, dict(dz_ptr=dt, p_ptr=dt, dp_ptr=dt),
          dict(DZ_DIMS=3, ACT=act, TRAIN=train, STORE_DP=store, BLOCK_M=32, BLOCK_C=128), dict(num_warps=8))
for dt, act in (("*bf16", 0), ("*fp32", 2)):
    build(P._apply_kernel, dict(p_ptr=dt, z_ptr=dt), dict(Z_DIMS=2, ACT=act, BLOCK_M=64, BLOCK_C=128),
          dict(num_warps=8))
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel is compiled for real by the other tests")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile the GEMM (each epilogue with its sm_90
    configuration: register cap, split epilogue; the prologue; fp32 operands), the BN backward passes and
    the apply pass for sm_90, no GPU needed; the GEMM's PTX must use wgmma."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------- CUDA only: the paper's shapes

@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_gemm_paper_shape(dtype):
    """ConvMixer-1536 at 224x224, N=4: M = 4096 pixels, K = J = 1536; compared with torch.matmul."""
    a, b = _randn(4096, 1536, dtype=dtype, seed=60), _randn(1536, 1536, dtype=dtype, seed=61)
    c, _ = _matmul(a, b)
    row = compare("gemm", c, torch.matmul(a, b), a.double() @ b.double(), dtype)
    assert row.ok, format_rows([row])


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [256, 1536, 4096])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_block_paper_shapes_bf16_autocast(dim, layout):
    ref = randomize_(pointwise_reference(dim, "gelu"))
    fused, ref_d, ref64 = three_copies(ref, lambda m: FusedPointwiseBlock.from_module(m, backend="triton"),
                                       torch.float32, DEVICE)
    xs = make_inputs((4, dim, 32, 32), 2, layout)
    rows = compare_train_then_eval(fused, ref_d, ref64, xs[:1], xs[1:], torch.float32, autocast=torch.bfloat16)
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    assert fused.last_backend == "triton"


@gpu_only
@pytest.mark.gpu
def test_gpu_float32_follows_tf32_setting():
    """With tf32 allowed, the float32 GEMM uses tf32 as torch.matmul does: its error is that of torch's
    tf32 matmul (within the rule), and larger than with tf32 off."""
    a, b = _randn(2048, 1024, seed=62), _randn(1024, 512, seed=63)
    ref = a.double() @ b.double()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        c_tf32, _ = _matmul(a, b)
        row = compare("gemm tf32", c_tf32, torch.matmul(a, b), ref, torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = False
        c_ieee, _ = _matmul(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert row.ok, format_rows([row])
    assert _rel(c_ieee, ref) <= 1e-6 < _rel(c_tf32, ref)


@gpu_only
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_64bit_indices():
    """M * C > 2**31 elements: offsets must be 64-bit (eval forward, last rows checked)."""
    n, c, hw = 1, 72, 2 ** 25  # 2.4e9 elements per tensor, bf16: 4.8 GB each
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs 24 GB of GPU memory")
    x = torch.randn(n, c, hw, 1, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = _randn(c, c, 1, 1, dtype=torch.bfloat16, seed=64)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    with torch.no_grad():
        z = TRITON(x, w, None, None, None, rm, rv, False, 0.1, 1e-5, activation="relu")
    tail = x[:, :, -1000:]
    ref = torch.relu(torch.nn.functional.conv2d(tail.float(), w.float())) / (1 + 1e-5) ** 0.5
    torch.testing.assert_close(z[:, :, -1000:].float(), ref, rtol=2e-2, atol=2e-2)
