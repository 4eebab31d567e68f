"""The Triton depthwise launchers' input-side prologue (ops/prologue.py, design.md 3.3): ``conv_stats`` and
``input_grad`` with ``prologue=Affine`` read z = act(x) * s + t wherever they read x, the conv's zero
padding applied to z.

What "equal" means here, and why:

* Against the launchers fed a materialized z of the kernel's own rounding (``_kernel_z``: the same
  launcher with a 1x1 identity weight, whose a is exactly the staged z): **bitwise**, a, the
  partials, dx, dw and db. The prologue changes only what is staged; every sum after it runs in the
  same order on the same values, so nothing may differ, not even in the last bit.
* The kernel's z against the specification ``affine_reference``: ReLU on inputs whose z is exact
  (x, s and t with few mantissa bits, so no rounding anywhere) **bitwise**, and then the launchers
  are compared with ``affine_reference``'s z directly, bitwise. GELU / GELU-tanh: within a few units
  in the last place of the terms' scale |x|*|s| + |t| (``_Z_ULPS``): PyTorch's CPU float32 GELU (erf)
  is itself up to ~4 ulp off float64 (the kernel ~1), and the Triton interpreter rounds float32 ->
  bfloat16 toward zero where PyTorch rounds to nearest even (at most one bf16 ulp apart). The conv
  of ``affine_reference``'s z is then checked against the error bound that ulp difference implies.

Interpreter (no GPU): tiny maps, the conv kernels forced to 4x4 tiles over 4-channel blocks on 5x6
maps (halos across tiles, partial tiles and a partial channel block, several tiles per persistent
program; the weight gradient keeps the interpreter's default tiles); autotuning off and a fixed
persistent grid, so both sides of every comparison launch the same programs. Outputs are poisoned
with NaN (tests/conftest.py). The prologue's arithmetic does not depend on the layout or on k, so
the cases below pair every activation with both dtypes and spread layouts and kernel sizes over them.
"""
import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels.ops import alloc
from convmixer_kernels.ops import depthwise_block as D
from convmixer_kernels.ops.activation import ACT_CODE
from convmixer_kernels.ops.batchnorm import SCALE, SHIFT
from convmixer_kernels.ops.prologue import Affine, affine_reference
from convmixer_kernels.ops.triton import common as TC
from convmixer_kernels.ops.triton import depthwise as TD
from harness import DEVICE, backends_under_test

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(D.OP),
                                reason="the Triton backend cannot run here (no CUDA and no TRITON_INTERPRET)")

# |z_kernel - affine_reference| <= _Z_ULPS ulps of the dtype at |x|*|s| + |t| (module docstring)
_Z_ULPS = {torch.float32: 8, torch.bfloat16: 2}
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7}


@pytest.fixture(autouse=True)
def _fixed_launches(monkeypatch):
    """The same tiles and persistent grid for every launch of a comparison (with and without a prologue), and
    the same path: a prologue runs on the CUDA-core kernels, so the materialized z is fed to them too (half
    types would otherwise take the tensor-core path, ops/triton/depthwise.py ``_path``)."""
    monkeypatch.setenv("CONVMIXER_KERNELS_AUTOTUNE", "0")
    monkeypatch.setenv("CONVMIXER_KERNELS_DW_PATH", "cuda_cores")
    monkeypatch.setattr(TD, "_resident", lambda kernel, key, args, meta, device: 4 * TC.num_sms(device))
    if TC.interpreting(DEVICE):
        cfg = TD.TileConfig(4, 4, 4, 1)
        monkeypatch.setattr(TD, "default_config", lambda *args, **kw: cfg)
    assert alloc.poisoning(), "tests/conftest.py sets CONVMIXER_KERNELS_POISON=1"


# ---------------------------------------------------------------- inputs

def _ulp(v, dtype):
    """One unit in the last place of dtype at |v| (float64; normal range)."""
    e = torch.floor(torch.log2(v.double().abs().clamp_min(2.0 ** -126)))
    return torch.exp2(e - _MANTISSA[dtype])


def _inputs(N, C, H, W, k, dtype, layout, exact, seed):
    """x, conv weight and bias, and a prologue's finalized [6, C] (SHIFT at least 0.5 in magnitude).
    ``exact``: x in quarters within [-2, 2], s and t in eighths within [-2, 2]: relu(x)*s + t is then an
    integer multiple of 1/32 below 256/32, exact in float32 and bfloat16."""
    g = torch.Generator().manual_seed(seed)
    fin = torch.randn(6, C, generator=g).abs() + 0.1
    sign = torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0)
    if exact:
        x = torch.randint(-8, 9, (N, C, H, W), generator=g) / 4.0
        fin[SCALE] = torch.randint(4, 17, (C,), generator=g) / 8.0 * torch.where(torch.rand(C, generator=g) < 0.3,
                                                                                -1.0, 1.0)
        fin[SHIFT] = torch.randint(4, 17, (C,), generator=g) / 8.0 * sign
    else:
        x = torch.randn(N, C, H, W, generator=g) * 1.5
        fin[SCALE] = torch.rand(C, generator=g) * 1.5 + 0.25
        fin[SHIFT] = (torch.rand(C, generator=g) + 0.5) * sign
    w = torch.randn(C, 1, k, k, generator=g) * 0.4
    b = torch.randn(C, generator=g) * 0.2
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(DEVICE, dtype).contiguous(memory_format=fmt)
    return x, w.to(DEVICE, dtype), b.to(DEVICE, dtype), fin.to(DEVICE)


def _backward_inputs(x, seed):
    g = torch.Generator().manual_seed(seed)
    C = x.shape[1]
    dy = torch.randn(x.shape, generator=g).to(DEVICE, x.dtype).contiguous(memory_format=alloc.output_format(x))
    coef = torch.stack([torch.randn(C, generator=g), torch.randn(C, generator=g) * 0.3,
                        torch.randn(C, generator=g) * 0.1, torch.randn(C, generator=g) * 0.1]).to(DEVICE)
    return dy, coef


def _kernel_z(x, prologue):
    """z as the kernels stage it: ``conv_stats`` with a 1x1 identity weight and no bias (a = 1 * z, exact)."""
    one = torch.ones(x.shape[1], 1, 1, 1, dtype=x.dtype, device=x.device)
    z, _ = TD.conv_stats(x, one, None, ACT_CODE["relu"], (0, 0), prologue=prologue)
    return z


def _assert_equal(got, want, what):
    assert got.shape == want.shape and got.stride() == want.stride(), what
    assert torch.isfinite(got).all(), f"{what}: unwritten (NaN) or non-finite elements"
    assert torch.equal(got, want), f"{what}: max |diff| {(got.double() - want.double()).abs().max().item():.3g}"


# ---------------------------------------------------------------- the launchers against a materialized z

# (activation, dtype, layout, k, (H, W)): every activation with both dtypes and layouts, odd and even k,
# and kernels larger than the map (5x5 with k = 7)
CASES = [
    ("gelu", torch.float32, "nchw", 3, (5, 6)),
    ("gelu", torch.bfloat16, "channels_last", 4, (5, 6)),
    ("gelu_tanh", torch.float32, "channels_last", 5, (5, 6)),
    ("gelu_tanh", torch.bfloat16, "nchw", 4, (5, 6)),
    ("relu", torch.float32, "channels_last", 7, (5, 5)),
    ("relu", torch.bfloat16, "nchw", 5, (5, 6)),
]


@pytest.mark.parametrize("activation,dtype,layout,k,hw", CASES,
                         ids=[f"{a}-{str(d)[6:]}-{lay}-k{k}-{hw[0]}x{hw[1]}" for a, d, lay, k, hw in CASES])
def test_prologue_equals_materialized_z(activation, dtype, layout, k, hw):
    """conv_stats(x, prologue=A) and input_grad(..., x, prologue=A) against the same launchers on z:
    bitwise on the kernel's own z; on ``affine_reference``'s z bitwise (relu, exact z) or within the
    error bound of their z's difference (gelu forms), see the module docstring."""
    act = ACT_CODE[activation]
    exact = activation == "relu"
    x, w, b, fin = _inputs(2, 6, *hw, k, dtype, layout, exact, seed=k)
    A = Affine(fin, act)
    pads = D.same_padding("same", (k, k))

    # the staged z against the specification
    z_ref = affine_reference(x, A)
    z = _kernel_z(x, A)
    assert z.stride() == x.stride() == z_ref.stride()
    if exact:
        _assert_equal(z, z_ref, "z (exact)")
    else:
        scale = x.double().abs() * fin[SCALE].double().abs().view(1, -1, 1, 1) + fin[SHIFT].double().abs().view(
            1, -1, 1, 1)
        err = (z.double() - z_ref.double()).abs()
        assert (err <= _Z_ULPS[dtype] * _ulp(scale, dtype)).all(), f"z: max |diff| {err.max().item():.3g}"

    # forward: a and the partials
    a, part = TD.conv_stats(x, w, b, act, pads, prologue=A)
    a_z, part_z = TD.conv_stats(z, w, b, act, pads)
    _assert_equal(a, a_z, "a")
    _assert_equal(part, part_z, "partials")
    if not exact:  # the conv of the specification's z: the same sums of z's that differ by err
        a_ref, _ = TD.conv_stats(z_ref, w, b, act, pads)
        w64 = w.double().abs()
        spread = F.conv2d(err, w64, padding="same", groups=x.shape[1])
        mag = F.conv2d(z_ref.double().abs(), w64, padding="same", groups=x.shape[1])
        mag = mag + b.double().abs().view(1, -1, 1, 1)
        bound = spread + k * k * 2.0 ** -23 * mag + 2 * _ulp(mag, dtype)
        diff = (a.double() - a_ref.double()).abs()
        assert (diff <= bound).all(), f"a vs affine_reference: max |diff| {diff.max().item():.3g}"

    # backward: dw reads z; dx (the gradient with respect to z) and db do not depend on it
    dy, coef = _backward_inputs(x, seed=k + 1)
    dx, dw, db = TD.input_grad(dy, a, x, w, coef, act, pads, True, True, True, True, prologue=A)
    dx_z, dw_z, db_z = TD.input_grad(dy, a, z, w, coef, act, pads, True, True, True, True)
    _assert_equal(dx, dx_z, "dx")
    _assert_equal(dw, dw_z, "dw")
    _assert_equal(db, db_z, "db")
    if exact:  # z is the specification's: so are the results
        a_ref, part_ref = TD.conv_stats(z_ref, w, b, act, pads)
        _assert_equal(a, a_ref, "a vs affine_reference")
        _assert_equal(part, part_ref, "partials vs affine_reference")


def test_eval_kernel_reads_the_residual_as_z_too():
    """``_conv_kernel``'s eval epilogue with a prologue (no launcher exposes it yet): the residual it adds
    is z as well, so y and a equal ``conv_apply`` on the materialized z."""
    x, w, b, fin = _inputs(2, 6, 5, 6, 3, torch.bfloat16, "channels_last", False, seed=11)
    A = Affine(fin, ACT_CODE["gelu_tanh"])
    bn = torch.randn(6, 6, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    pads = (1, 1)
    z = _kernel_z(x, A)
    y_z, a_z = TD.conv_apply(z, w, b, bn, ACT_CODE["gelu"], pads, True)
    y, a = alloc.empty_output(x), alloc.empty_output(x)
    cfg = TD.candidates(5, 6, 6, True, DEVICE, 3, "eval")[0]
    TD._conv_launch(x, TD._weights_per_block(w), b, y, a, bn[SCALE], bn[SHIFT], (3, 3), pads, ACT_CODE["gelu"],
                    False, True, cfg, False, {}, A)
    _assert_equal(a, a_z, "a")
    _assert_equal(y, y_z, "y")


# ---------------------------------------------------------------- the comparison can fail

def test_padding_with_affine_of_zero_would_be_caught():
    """A prologue that padded with act(0)*s + t (= t for relu) instead of 0 would differ from what the
    tests above demand: the float64 model of that bug misses the kernel's a and dw by far more than
    rounding, while the float64 conv with zero padding of z matches them."""
    x, w, b, fin = _inputs(2, 4, 5, 6, 3, torch.float32, "nchw", True, seed=21)
    fin[SHIFT] = fin[SHIFT].abs()  # t > 0
    A = Affine(fin, ACT_CODE["relu"])
    pads = (1, 1)
    C = x.shape[1]
    a, _ = TD.conv_stats(x, w, b, ACT_CODE["relu"], pads, prologue=A)
    dy, coef = _backward_inputs(x, seed=22)
    _, dw, _ = TD.input_grad(dy, a, x, w, coef, ACT_CODE["relu"], pads, False, False, True, False, prologue=A)

    z64 = affine_reference(x.double(), A)
    t = fin[SHIFT].double().view(1, -1, 1, 1)
    wrong = t.expand(x.shape[0], C, x.shape[2] + 2, x.shape[3] + 2).clone()  # padded with act(0)*s + t = t
    wrong[:, :, 1:-1, 1:-1] = z64
    w64, b64 = w.double(), b.double()
    a_right = F.conv2d(z64, w64, b64, padding=pads, groups=C)
    a_wrong = F.conv2d(wrong, w64, b64, groups=C)
    da = (a.double() > 0).double() * coef[0].double().view(1, -1, 1, 1) * dy.double()  # eval coefficients, relu
    dw_right = torch.nn.grad.conv2d_weight(z64, w.shape, da, padding=pads, groups=C)
    dw_wrong = torch.nn.grad.conv2d_weight(wrong, w.shape, da, groups=C)

    torch.testing.assert_close(a.double(), a_right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw_right, rtol=1e-5, atol=1e-5)
    assert (a.double() - a_wrong).abs().max() > 0.1
    assert (dw.double() - dw_wrong).abs().max() > 0.1
    # and the launchers on a materialized z agree with the right model, not the wrong one
    a_z, _ = TD.conv_stats(affine_reference(x, A), w, b, ACT_CODE["relu"], pads)
    assert torch.equal(a, a_z) and (a_z.double() - a_wrong).abs().max() > 0.1
