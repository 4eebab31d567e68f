"""Triton device functions for the activations, shared by every fused kernel.

``ACT`` is the constexpr code from ``activation.ACT_CODE``: 0 GELU (erf), 1 GELU
(tanh), 2 ReLU. All math is float32. The exact GELU evaluates the normal CDF with the branch-free
polynomials of ``ops/normal_cdf.py`` (cheaper than libdevice's erf). NaN propagates exactly as in PyTorch:
relu(NaN) = NaN (so ``where(x < 0, 0, x)``, not ``where(x > 0, x, 0)``), and
relu'(NaN) = 0 as in threshold_backward.
"""
import triton
import triton.language as tl

from ..normal_cdf import LARGE, SHIFT, SMALL, SPLIT, TAIL

# tl.constexpr: the compiler refuses plain module-level floats (the interpreter does not notice).
# Keep a tensor on the left of every product: the interpreter mishandles constexpr * tensor.
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_COEF = tl.constexpr(0.044715)
_TANH_COEF_X3 = tl.constexpr(3 * 0.044715)
_NEG_HALF_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)  # exp(-x^2/2) = 2^(x^2 * this)
_CDF_SPLIT = tl.constexpr(SPLIT)
_CDF_TAIL = tl.constexpr(TAIL)
_CDF_SHIFT = tl.constexpr(SHIFT)
_S0, _S1, _S2, _S3, _S4, _S5 = (tl.constexpr(c) for c in SMALL)
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = (tl.constexpr(c) for c in LARGE)


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates correctly at +-inf and needs no libdevice
    return 1.0 - 2.0 / (tl.exp(u * 2.0) + 1.0)


@triton.jit
def normal_cdf(x, s):
    """Phi(x) given s = x * x (the derivative reuses s); the polynomials of ops/normal_cdf.py."""
    p = s * _S5 + _S4
    p = p * s + _S3
    p = p * s + _S2
    p = p * s + _S1
    p = p * s + _S0
    small = x * p + 0.5
    t = tl.abs(x)
    v = t - _CDF_SHIFT
    q = v * _L8 + _L7
    q = q * v + _L6
    q = q * v + _L5
    q = q * v + _L4
    q = q * v + _L3
    q = q * v + _L2
    q = q * v + _L1
    q = q * v + _L0
    q = tl.where(t < _CDF_TAIL, tl.exp2(q), 0.0)  # Phi(-|x|)
    return tl.where(t < _CDF_SPLIT, small, tl.where(x > 0.0, 1.0 - q, q))


@triton.jit
def normal_pdf(s):
    """phi(x) given s = x * x."""
    return tl.exp2(s * _NEG_HALF_LOG2E) * _INV_SQRT_2PI


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    if ACT == 0:
        return a * normal_cdf(a, a * a)
    elif ACT == 1:
        return 0.5 * a * (1.0 + _tanh((a + a * a * a * _TANH_COEF) * _SQRT_2_OVER_PI))
    else:
        return tl.where(a < 0.0, 0.0, a)


@triton.jit
def act_grad(a, ACT: tl.constexpr):
    """d act(a) / da."""
    if ACT == 0:
        s = a * a
        return normal_cdf(a, s) + a * normal_pdf(s)
    elif ACT == 1:
        t = _tanh((a + a * a * a * _TANH_COEF) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + a * a * _TANH_COEF_X3)
    else:
        return tl.where(a > 0.0, 1.0, 0.0)


@triton.jit
def act_both(a, ACT: tl.constexpr):
    """(act(a), act'(a)) from one normal CDF / tanh: the expressions of ``act_fwd`` and
    ``act_grad`` term for term, sharing the transcendental."""
    if ACT == 0:
        s = a * a
        cdf = normal_cdf(a, s)
        return a * cdf, cdf + a * normal_pdf(s)
    elif ACT == 1:
        t = _tanh((a + a * a * a * _TANH_COEF) * _SQRT_2_OVER_PI)
        return (0.5 * a * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + a * a * _TANH_COEF_X3))
    else:
        return tl.where(a < 0.0, 0.0, a), tl.where(a > 0.0, 1.0, 0.0)
