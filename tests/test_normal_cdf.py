"""The normal CDF behind the fused kernels' exact GELU (ops/normal_cdf.py): the coefficients refit from
scratch, its float32 accuracy against float64 and against torch's own float32 GELU, and the Triton
device functions (act_fwd, act_grad, act_both) evaluated by the kernels' compiler or interpreter."""
import math
import os
import re

import numpy as np
import pytest
import torch

from convmixer_kernels import backends
from convmixer_kernels.ops import normal_cdf
from harness import DEVICE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = np.concatenate([np.linspace(-9.0, 9.0, 90001), np.linspace(-1e-3, 1e-3, 201),
                       [0.0, -0.0, normal_cdf.SPLIT, -normal_cdf.SPLIT, normal_cdf.TAIL, -normal_cdf.TAIL]])
X32 = GRID.astype(np.float32)
X64 = X32.astype(np.float64)  # the float32 inputs, exactly
PHI64 = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in X64])
PDF64 = np.exp(-0.5 * X64 * X64) / math.sqrt(2.0 * math.pi)


def _torch_phi32():
    x = torch.from_numpy(X32)
    return (0.5 * (1.0 + torch.erf(x * math.sqrt(0.5)))).double().numpy()


def test_coefficients_are_what_the_fit_gives():
    small, large = normal_cdf.fit()
    np.testing.assert_allclose(small, normal_cdf.SMALL, rtol=1e-5)
    np.testing.assert_allclose(large, normal_cdf.LARGE, rtol=1e-5, atol=1e-9)


def test_float32_cdf_is_as_accurate_as_torchs():
    ours = normal_cdf.normal_cdf_float32(X32).astype(np.float64)
    theirs = _torch_phi32()
    err, their_err = np.abs(ours - PHI64), np.abs(theirs - PHI64)
    assert err.max() <= 1.5 * 2.0 ** -24 * 2  # <= 1.5 float32 ulp of 1 (torch: ~1 ulp)
    assert np.sqrt(np.mean(err ** 2)) <= 1.1 * np.sqrt(np.mean(their_err ** 2))
    # the lower tail is relative-accurate (torch's 1 + erf cancels): x in [-5, -1]
    tail = (X64 > -5.0) & (X64 < -1.0)
    rel = err[tail] / PHI64[tail]
    assert rel.max() < 2e-6 < (their_err[tail] / PHI64[tail]).max()
    assert np.all(ours[X64 <= -normal_cdf.TAIL] == 0.0) and np.all(ours[X64 >= normal_cdf.TAIL] == 1.0)
    assert np.all(np.diff(ours[:90001]) >= 0)  # monotone on the sorted part of the grid


def test_cuda_sources_carry_the_same_coefficients():
    text = open(os.path.join(REPO, "csrc", "kernels", "common.cuh")).read()
    for name, coef in (("kCdfSmall", normal_cdf.SMALL), ("kCdfLarge", normal_cdf.LARGE)):
        body = re.search(name + r"\[\d+\]\s*=\s*\{([^}]*)\}", text)
        assert body, f"{name} not found in csrc/kernels/common.cuh"
        values = [float(v.rstrip("f")) for v in re.findall(r"[-+0-9.e]+f", body.group(1))]
        assert values == [float(np.float32(c)) for c in coef], name
    for name, value in (("kCdfSplit", normal_cdf.SPLIT), ("kCdfTail", normal_cdf.TAIL), ("kCdfShift", normal_cdf.SHIFT)):
        m = re.search(name + r"\s*=\s*([-+0-9.e]+)f", text)
        assert m and float(m.group(1)) == value, name


triton_here = pytest.mark.skipif(backends.environment_reason("triton", DEVICE) is not None,
                                 reason=f"triton cannot run here: {backends.environment_reason('triton', DEVICE)}")


def _triton_act(x: torch.Tensor):
    import triton

    out = torch.full((4, x.numel()), float("nan"), device=x.device)
    _act_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out.cpu().double().numpy()


try:
    import triton
    import triton.language as tl

    from convmixer_kernels.ops.triton.activation import act_both, act_fwd, act_grad

    @triton.jit
    def _act_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g, dg = act_both(a, 0)
        tl.store(out_ptr + offs, act_fwd(a, 0), mask=mask)
        tl.store(out_ptr + n + offs, act_grad(a, 0), mask=mask)
        tl.store(out_ptr + 2 * n + offs, g, mask=mask)
        tl.store(out_ptr + 3 * n + offs, dg, mask=mask)
except ImportError:  # the tests that need it are skipped
    pass


@triton_here
def test_triton_gelu_and_its_derivative_match_float64():
    x = torch.from_numpy(X32).to(DEVICE)
    gelu, dgelu, gelu_both, dgelu_both = _triton_act(x)
    np.testing.assert_array_equal(gelu, gelu_both)  # act_both: the same expressions, term for term
    np.testing.assert_array_equal(dgelu, dgelu_both)
    ref, dref = X64 * PHI64, PHI64 + X64 * PDF64
    torch_gelu = torch.nn.functional.gelu(torch.from_numpy(X32)).double().numpy()
    scale = np.maximum(1.0, np.abs(X64))
    # the GPU's ex2.approx adds ~2 ulp to q; the bound leaves room for it
    assert np.max(np.abs(gelu - ref) / scale) <= 4 * 2.0 ** -24
    assert np.max(np.abs(dgelu - dref) / scale) <= 6 * 2.0 ** -24
    assert np.sqrt(np.mean((gelu - ref) ** 2)) <= 1.1 * np.sqrt(np.mean((torch_gelu - ref) ** 2))


@triton_here
def test_triton_gelu_propagates_nan_and_keeps_signed_zero():
    """NaN in, NaN out (value and derivative); GELU(+inf) = +inf as x * 1 (torch's CPU kernel says NaN, its
    CUDA kernel inf); -inf gives -inf * 0 = NaN as in torch's formula."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], device=DEVICE)
    gelu, dgelu, _, _ = _triton_act(x)
    assert np.isnan(gelu[0]) and np.isnan(dgelu[0])
    assert gelu[1] == np.inf and np.isnan(gelu[2])
    assert gelu[3] == 0.0 and not np.signbit(gelu[3]) and gelu[4] == 0.0 and np.signbit(gelu[4])
    assert dgelu[3] == dgelu[4] == 0.5
