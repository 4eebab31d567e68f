"""The pointwise GEMM's operand prologue (design.md 3.3, ``ops/prologue.py``) on the Triton backend.

``linear(x, ..., prologue=P)`` builds its A operand r = ``operand_reference(x, P)`` as it loads x, and
``input_grad(..., prologue=P)`` builds the weight gradient's B operand (dW = dp^T r) the same way. The
checks, per case:

1. the operand as the kernel builds it (read back through an identity GEMM, A side and B side: equal)
   against ``operand_reference``'s arithmetic. Float32: the same operations, so equal up to the
   transcendental (Triton's erf / tanh vs torch's: a few float32 ulps of the terms summed). Bfloat16:
   the kernel rounds to nearest even as torch does (on a GPU, and under the interpreter too, whose
   truncating float32 -> bfloat16 cast tests/conftest.py makes round as the GPU does);
2. ``linear(x, prologue=P)`` and ``input_grad(..., prologue=P)`` against the same launchers on the
   operand the prologue built, stored: bitwise (interpreter: the same tiles, the same operand values,
   the same order of accumulation), including the statistics partials, dx and db;
3. against the launchers on the materialized ``operand_reference(x, P)``: the difference is the one
   explained by the operands' difference, ||dr|| ||W|| (forward) and ||dp|| ||dr|| (dW), plus one
   rounding of the output.

Shapes: M = 2*5*7 = 70 pixels (5 row tiles of 16, the last ragged; > 64, so the interpreter's weight
gradient splits K in 2: 64 + 6), Cin = 19, Cout = 21 (ragged 16-wide tiles). Residuals: x's layout (the
shared offsets), the other layout and a 3-dim strided view (their own strides).
"""
import os
import subprocess
import sys

import pytest
import torch

from convmixer_kernels import backends
from convmixer_kernels.ops.activation import ACT_CODE, activation_reference
from convmixer_kernels.ops.batchnorm import SCALE, SHIFT
from convmixer_kernels.ops.prologue import Affine, Operand, affine_reference, operand_reference
from convmixer_kernels.ops.triton import common as TC
from convmixer_kernels.ops.triton import pointwise as TP
from harness import DEVICE, ON_GPU

pytestmark = pytest.mark.skipif(backends.environment_reason("triton", DEVICE) is not None,
                                reason=f"triton cannot run here: {backends.environment_reason('triton', DEVICE)}")

INTERP = TC.interpreting(DEVICE)
SHAPE = (2, 19, 5, 7)
COUT = 21
ACTS = ["gelu", "gelu_tanh", "relu"]
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# what the operand is made of: (affine on x, residual layout or None, residual affine)
KINDS = {
    "affine": (True, None, False),
    "affine+res": (True, "same", False),  # the first layer: r = act(a)*s1 + t1 + x
    "affine+res_affine": (True, "other", True),  # a later layer: r = act(a)*s1 + t1 + act(p)*s0 + t0
    "res_affine_only": (False, "view", True),
    "res_only": (False, "other", False),
}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _finalized(c, seed):
    """A [6, C] finalized block with random scale (never 1) and shift (never 0) rows."""
    fin = _randn(6, c, seed=seed)
    fin[SCALE] = _randn(c, seed=seed + 1, scale=0.7) + 1.0
    fin[SHIFT] = _randn(c, seed=seed + 2, scale=0.5)
    return fin


def _case(kind, act, dtype, layout, seed=0):
    """(x, operand) for one case; the residual's activation differs from x's."""
    with_affine, res_layout, res_affine = KINDS[kind]
    n, c, h, w = SHAPE
    x = _layout(_randn(*SHAPE, dtype=dtype, seed=seed), layout)
    res = None
    if res_layout == "view":  # [2, C, 5, 7] out of [3, C, 10, 8]: three pixel dims
        res = _randn(3, c, 10, 8, dtype=dtype, seed=seed + 1)[::2, :, ::2, 1:]
        assert TP._pixels(res).dims == 3
    elif res_layout is not None:
        other = "nchw" if layout == "channels_last" else "channels_last"
        res = _layout(_randn(*SHAPE, dtype=dtype, seed=seed + 1), layout if res_layout == "same" else other)
    code = ACT_CODE[act]
    affine = Affine(_finalized(c, seed + 10), code) if with_affine else None
    raff = Affine(_finalized(c, seed + 20), (code + 1) % 3) if res_affine else None
    return x, Operand(affine, res, raff)


def _round(t, dtype):
    """float32 -> dtype as the kernels round (to nearest even; conftest.py makes the interpreter do so)."""
    if dtype == torch.float32:
        return t.float()
    return t.to(dtype)


def _size(t, affine):
    """|t| |s| + |shift|, or |t|: the size of the terms an affine sums. The float32 differences of the
    transcendentals scale with it, not with the result: GELU is 0.5 t (1 + erf(t / sqrt 2)), whose
    1 + erf cancels for negative t, and act(t) s + shift may cancel too."""
    if affine is None:
        return t.double().abs()
    view = (1, -1, 1, 1)
    fin = affine.finalized.double()
    return t.double().abs() * fin[SCALE].abs().view(view) + fin[SHIFT].abs().view(view)


def _rounded(x, op):
    """``operand_reference(x, op)`` with this device's casts (equal to it on a GPU), and the size of the terms."""
    r = affine_reference(x, op.affine, rounded=False)
    size = _size(x, op.affine)
    if op.residual is not None:
        term = affine_reference(op.residual, op.residual_affine, rounded=False)
        if op.residual_affine is not None:
            term = _round(term, op.residual.dtype).float()
        r = r + term
        size = size + _size(op.residual, op.residual_affine)
    return _round(r, x.dtype), size


def _pixels_by_channels(t):
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _built_a(x, op):
    """The operand as the A side builds it, [M, C]: linear(x, I) with the prologue (an fp32 accumulation
    of one exact product per element, rounded to x's dtype: the operand itself)."""
    c = x.shape[1]
    return TP.linear(x, torch.eye(c, dtype=x.dtype, device=DEVICE).view(c, c, 1, 1), None, 0, False, prologue=op)[0]


def _built_b(x, op):
    """The operand as the B side builds it, [M, C]: an identity A ([M, M]) times the B-side prologue's B.
    Tiles of 32 x 16 x 32 (3 x 2 programs, 3 K steps; fewer interpreted steps than the 16-cube)."""
    n, c, h, w = x.shape
    m = n * h * w
    r_b = torch.full((m, c), float("nan"), dtype=x.dtype, device=DEVICE)
    TP.gemm(torch.eye(m, dtype=x.dtype, device=DEVICE), TP._linear(m), 1, x, TP._pixels(x), x.stride(1),
            r_b, TP._linear(c), 1, m, c, m, prologue=TP._operand_prologue(op, x, on_b=True),
            config=None if ON_GPU else TP.GemmConfig(32, 16, 32, 2, 4, 1))
    return r_b


def _as_input(r, shape):
    """A [M, C] operand as an [N, C, H, W] (channels_last) tensor for the launchers."""
    n, c, h, w = shape
    return r.view(n, h, w, c).permute(0, 3, 1, 2)


def _same(a, b, what):
    if INTERP:
        assert torch.equal(a, b), f"{what}: not bitwise equal (max diff {(a.double() - b.double()).abs().max()})"
    else:  # a GPU may autotune the two launches to different tile shapes
        torch.testing.assert_close(a, b, rtol=2e-2 if a.dtype == torch.bfloat16 else 1e-5, atol=1e-5, msg=what)


def _norm(t):
    return float(t.double().norm())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_operand_built_on_load_follows_operand_reference(act, dtype, kind):
    """Every activation, dtype and kind of operand; x's layout alternates (both meet every kind)."""
    layout = LAYOUTS[(ACTS.index(act) + DTYPES.index(dtype) + list(KINDS).index(kind)) % 2]
    x, op = _case(kind, act, dtype, layout)
    r_a, r_b = _built_a(x, op), _built_b(x, op)
    assert torch.equal(r_a, r_b), "the A-side and B-side prologues build different operands"
    want, size = _rounded(x, op)
    want, size = _pixels_by_channels(want), _pixels_by_channels(size)
    diff = (r_a.double() - want.double()).abs()
    if dtype == torch.float32:
        # relu (and no other activation) makes the same float32 operations as the reference: bitwise
        exact = act == "relu" and (op.residual_affine is None or op.residual_affine.act == ACT_CODE["relu"])
        bound = 0.0 if exact and INTERP else 2.0 ** -20 * size.double() + 1e-30
        assert bool((diff <= bound).all()), f"max diff {diff.max():.3g} (bound {bound if exact else 'ulps'})"
    else:
        # a few-ulp float32 difference of erf / tanh may flip a bfloat16 rounding: one ulp, rarely
        ulp = 2.0 ** -7 * want.double().abs().clamp_min(2.0 ** -126)
        assert bool((diff <= ulp).all()), f"max diff {diff.max():.3g}"
        assert int((diff > 0).sum()) <= max(2, diff.numel() // 50), f"{int((diff > 0).sum())} of {diff.numel()} differ"
    # the operand_reference itself: within one bfloat16 ulp of the terms
    ref = _pixels_by_channels(operand_reference(x, op)).double()
    tol = (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20) * (size.double() + ref.abs()) + 1e-30
    assert bool(((r_a.double() - ref).abs() <= tol).all())


def _launcher_cases():
    """dtype x layout x kind, with the activation turning over so that each one meets every kind,
    dtype and layout; bias on in half of them."""
    out = []
    for d, dtype in enumerate(DTYPES):
        for l, layout in enumerate(LAYOUTS):
            for k, kind in enumerate(KINDS):
                act, bias = ACTS[(k + d + 2 * l) % 3], (k + d + l) % 2 == 0
                name = f"{act}-{str(dtype)[6:]}-{layout}-{kind}-{'bias' if bias else 'nobias'}"
                out.append(pytest.param(act, dtype, layout, kind, bias, id=name))
    return out


@pytest.mark.parametrize("act,dtype,layout,kind,with_bias", _launcher_cases())
def test_linear_and_input_grad_with_prologue(act, dtype, layout, kind, with_bias):
    x, op = _case(kind, act, dtype, layout, seed=3)
    n, cin, h, w = SHAPE
    code = ACT_CODE[act]
    weight = _randn(COUT, cin, 1, 1, dtype=dtype, seed=40, scale=0.3)
    bias = _randn(COUT, dtype=dtype, seed=41) if with_bias else None
    r_k = _as_input(_built_a(x, op), SHAPE)  # the operand the prologue builds, stored
    r_ref = operand_reference(x, op)
    dr = _norm(_pixels_by_channels(r_k).double() - _pixels_by_channels(r_ref).double())
    u = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22  # one output rounding (with margin)

    # forward: p = r W^T + b and the statistics partials of act(p)
    p, part = TP.linear(x, weight, bias, code, True, prologue=op)
    p_k, part_k = TP.linear(r_k, weight, bias, code, True)
    _same(p, p_k, "p")
    _same(part, part_k, "statistics partials")
    p_ref, _ = TP.linear(r_ref, weight, bias, code, True)
    err = _norm(p.double() - p_ref.double())
    assert err <= dr * _norm(weight) + u * _norm(p_ref) + 1e-6, (err, dr)

    # backward: dx = dp W (the gradient with respect to r), dW = dp^T r (split-K: M = 70 > 64), db
    dz = _layout(_randn(n, COUT, h, w, dtype=dtype, seed=42), layout)
    coef = torch.stack([_randn(COUT, seed=43) + 1.5, _randn(COUT, seed=44, scale=0.3),
                        _randn(COUT, seed=45, scale=0.1), _randn(COUT, seed=46, scale=0.1)])
    train = kind != "affine"
    got = TP.input_grad(dz, p, x, weight, coef, code, train, True, True, with_bias, prologue=op)
    on_k = TP.input_grad(dz, p, r_k, weight, coef, code, train, True, True, with_bias)
    for name, a, b in zip(("dx", "dW", "db"), got, on_k):
        _same(a, b, name)
    dw_ref = TP.input_grad(dz, p, r_ref, weight, coef, code, train, False, True, False)[1]
    # ||dp|| recomputed in float64 (5% room for dp's own rounding)
    pr = p.double().requires_grad_(True)
    g = activation_reference(pr, act)
    gd, = torch.autograd.grad(g.sum(), pr)
    g = g.detach()
    dzm = _pixels_by_channels(dz.double())
    k1, k2, mdy, mean = (coef[i].double() for i in range(4))
    dg = k1 * (dzm - mdy) + k2 * (g - mean) if train else k1 * dzm
    dp_norm = 1.05 * _norm(dg * gd)
    err = _norm(got[1].double() - dw_ref.double())
    assert err <= dp_norm * dr + u * _norm(dw_ref) + 1e-6, (err, dr)


def test_no_prologue_and_an_empty_operand_change_nothing():
    x = _randn(*SHAPE, seed=60)
    weight, bias = _randn(COUT, SHAPE[1], 1, 1, seed=61), _randn(COUT, seed=62)
    assert TP._operand_prologue(Operand(), x, on_b=True) == dict(on_b=True)  # every switch off
    p, part = TP.linear(x, weight, bias, 0, True)
    for op in (None, Operand()):
        p2, part2 = TP.linear(x, weight, bias, 0, True, prologue=op)
        assert torch.equal(p, p2) and torch.equal(part, part2)
    dz, coef = _randn(SHAPE[0], COUT, *SHAPE[2:], seed=63), _randn(4, COUT, seed=64)
    base = TP.input_grad(dz, p, x, weight, coef, 0, True, True, True, True)
    got = TP.input_grad(dz, p, x, weight, coef, 0, True, True, True, True, prologue=Operand())
    assert all(torch.equal(a, b) for a, b in zip(base, got))


def test_input_grad_prologue_without_split_k():
    """M = 30 <= 64: the weight gradient in one GEMM (no partials) with the B-side prologue."""
    shape = (2, 19, 3, 5)
    x = _layout(_randn(*shape, dtype=torch.bfloat16, seed=70), "channels_last")
    res = _randn(*shape, dtype=torch.bfloat16, seed=71)
    op = Operand(Affine(_finalized(19, 72), ACT_CODE["gelu"]), res, Affine(_finalized(19, 75), ACT_CODE["relu"]))
    weight = _randn(COUT, 19, 1, 1, dtype=torch.bfloat16, seed=78)
    assert TP._split_k(COUT, 19, 30, torch.bfloat16, x.device) == 1 or not INTERP
    p, _ = TP.linear(x, weight, None, 0, True, prologue=op)
    r_k = TP.linear(x, torch.eye(19, dtype=torch.bfloat16).view(19, 19, 1, 1), None, 0, False, prologue=op)[0]
    r_k = _as_input(r_k, shape)
    dz, coef = _randn(2, COUT, 3, 5, dtype=torch.bfloat16, seed=79), _randn(4, COUT, seed=80)
    got = TP.input_grad(dz, p, x, weight, coef, 0, True, True, True, True, prologue=op)
    want = TP.input_grad(dz, p, r_k, weight, coef, 0, True, True, True, True)
    for name, a, b in zip(("dx", "dW", "db"), got, want):
        _same(a, b, name)


def test_prologue_errors_name_the_problem():
    x = _randn(*SHAPE, seed=90)
    weight = _randn(COUT, SHAPE[1], 1, 1, seed=91)
    fin = _finalized(SHAPE[1], 92)
    with pytest.raises(RuntimeError, match="residual of shape"):
        TP.linear(x, weight, None, 0, False, prologue=Operand(None, x[:, :, :4]))
    with pytest.raises(RuntimeError, match="no residual"):
        TP.linear(x, weight, None, 0, False, prologue=Operand(Affine(fin, 0), None, Affine(fin, 0)))
    with pytest.raises(RuntimeError, match=r"expected \[6, 19\]"):
        TP.linear(x, weight, None, 0, False, prologue=Operand(Affine(fin[:, :5], 0)))


_COMPILE = r"""
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from convmixer_kernels.ops.triton import pointwise as P

def build(ptrs, consts, opts):
    sig, cx = {}, {}
    for name in P._gemm_kernel.arg_names:
        if name in consts:
            sig[name], cx[name] = "constexpr", consts[name]
        else:
            sig[name] = ptrs.get(name, "*fp32") if name.endswith("_ptr") else "i32"
    return compile(ASTSource(P._gemm_kernel, sig, cx), target=GPUTarget("cuda", 90, 32), options=opts)

base = dict(A_DIMS=1, B_DIMS=1, C_DIMS=1, PRO_ACT=0, PRO_AFFINE=True, HAS_RES=True, RES_ACT=2, RES_AFFINE=True,
            HAS_BIAS=False, STATS=False, APPLY=False, ACT=0, DOT_F32=False, PRECISION="tf32", GROUP_I=8,
            EPI_SPLIT=1, BLOCK_I=128, BLOCK_J=128, BLOCK_K=64)
bf = dict(a_ptr="*bf16", b_ptr="*bf16", res_ptr="*bf16")
# the forward (A side; the residual through its own 2-dim pixel axis) and the weight gradient
# (B side, fp32 split-K partials; the residual sharing x's channels_last offsets)
for side, consts, ptrs in ((False, dict(RES_DIMS=2), dict(bf, c_ptr="*bf16")),
                           (True, dict(RES_DIMS=0, B_DIMS=2), dict(bf, c_ptr="*fp32"))):
    k = build(ptrs, dict(base, PRO_B=side, **consts), dict(num_warps=8, num_stages=3))
    assert "wgmma" in k.asm["ptx"], "no wgmma with the prologue"
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled for real by the other tests")
def test_prologue_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: both prologue sides, with the residual's own
    strides and affine, compile for sm_90 with wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
