"""Triton device functions for the activations, shared by every fused kernel.

``ACT`` is the constexpr code from ``activation.ACT_CODE``: 0 GELU (erf), 1 GELU
(tanh), 2 ReLU. All math is float32. NaN propagates exactly as in PyTorch:
relu(NaN) = NaN (so ``where(x < 0, 0, x)``, not ``where(x > 0, x, 0)``), and
relu'(NaN) = 0 as in threshold_backward.
"""
import triton
import triton.language as tl

# tl.constexpr: the compiler refuses plain module-level floats (the interpreter does not notice).
# Keep a tensor on the left of every product: the interpreter mishandles constexpr * tensor.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_COEF = tl.constexpr(0.044715)
_TANH_COEF_X3 = tl.constexpr(3 * 0.044715)


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates correctly at +-inf and needs no libdevice
    return 1.0 - 2.0 / (tl.exp(u * 2.0) + 1.0)


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * a * (1.0 + tl.math.erf(a * _SQRT1_2))
    elif ACT == 1:
        return 0.5 * a * (1.0 + _tanh((a + a * a * a * _TANH_COEF) * _SQRT_2_OVER_PI))
    else:
        return tl.where(a < 0.0, 0.0, a)


@triton.jit
def act_grad(a, ACT: tl.constexpr):
    """d act(a) / da."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT1_2))
        return cdf + a * tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    elif ACT == 1:
        t = _tanh((a + a * a * a * _TANH_COEF) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + a * a * _TANH_COEF_X3)
    else:
        return tl.where(a > 0.0, 1.0, 0.0)
