"""The standard normal CDF Phi(x) that the fused kernels' exact GELU uses, and how its coefficients were fitted.

GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2. In the Triton kernels libdevice's ``erff``
costs ~35 SASS instructions per element on sm_90 and made the elementwise passes issue-bound rather
than DRAM-bound (design.md §7). The kernels evaluate Phi directly instead, branch-free, in float32:

    |x| < SPLIT:        Phi(x) = 1/2 + x * P(x^2)                 (SMALL: P's coefficients, x^0 first)
    SPLIT <= |x| < TAIL: q = Phi(-|x|) = 2^L(|x| - SHIFT)          (LARGE: L's coefficients)
                         Phi(x) = 1 - q for x > 0, q for x < 0
    |x| >= TAIL:        Phi(x) = 1 or 0                           (Phi(-TAIL) < 1e-8: float32's 1 - q == 1,
                                                                    and torch's erf(x/sqrt 2) is already -1)

Both polynomials are near-minimax fits (Lawson's iteratively reweighted least squares, relative error of
Phi on the small interval, absolute error of L on the large one). Evaluated in float32 with fma, Phi's
largest error on [-9, 9] is ~1.5 float32 ulp of 1 in absolute terms (torch's own float32
``0.5 * (1 + erf(x / sqrt 2))``: ~1 ulp), and the lower tail is *more* accurate than torch's, which loses
everything to cancellation in 1 + erf: ~1e-6 relative at x = -3 against ~1e-5 (tests/test_normal_cdf.py
measures both). Cost per GELU in a one-line sm_90 test kernel: Triton ~24 instructions instead of ~35
(70 registers instead of 125); CUDA ~25 instead of nvcc's ``erff`` ~33.

``fit()`` regenerates the coefficients (numpy only, float64 ground truth from ``math.erfc``);
``csrc/kernels/common.cuh`` carries the same numbers for the CUDA extension (a test compares them).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

SPLIT = 1.3
TAIL = 5.7
SHIFT = 3.5  # L is fitted in |x| - SHIFT: centring the interval keeps float32 Horner evaluation accurate

SMALL = (0.3989422619342804, -0.06648989766836166, 0.009971076622605324, -0.0011819625506177545,
         0.00010977806959999725, -6.502261840068968e-06)
LARGE = (-12.069681167602539, -5.412113666534424, -0.6802788972854614, -0.005650958977639675,
         0.0008001740206964314, -0.00011017369251931086, 1.4402268789126538e-05, -1.7384899138050969e-06,
         1.4345530985337973e-07)


def _phi64(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _lawson(v: np.ndarray, f: np.ndarray, degree: int, weight: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Coefficients (v^0 first) of the polynomial minimising max |weight * (poly(v) - f)| (Lawson's algorithm)."""
    basis = np.stack([v ** i for i in range(degree + 1)], 1)
    lw = np.full(v.shape, 1.0 / v.size)
    for _ in range(iterations):
        w = np.sqrt(lw) * weight
        coef, *_ = np.linalg.lstsq(basis * w[:, None], f * w, rcond=None)
        err = np.abs((basis @ coef - f) * weight)
        lw = lw * err
        lw /= lw.sum()
    return coef


def fit(points: int = 4000) -> Tuple[List[float], List[float]]:
    """(SMALL, LARGE), rounded to float32, as fitted from scratch."""
    x = np.linspace(1e-4, SPLIT, points)
    phi = np.array([_phi64(v) for v in x])
    small = _lawson(x * x, (phi - 0.5) / x, len(SMALL) - 1, x / phi)  # relative error of Phi
    t = np.linspace(SPLIT, TAIL, points)
    large = _lawson(t - SHIFT, np.log2([_phi64(-v) for v in t]), len(LARGE) - 1, np.ones_like(t))
    return [float(np.float32(c)) for c in small], [float(np.float32(c)) for c in large]


def normal_cdf_float32(x: np.ndarray) -> np.ndarray:
    """What the kernels compute, emulated in numpy float32 (fma as one rounding of the float64 result)."""
    f32 = np.float32

    def horner(coef, v):
        r = np.full(v.shape, f32(coef[-1]))
        for c in coef[-2::-1]:
            r = (r.astype(np.float64) * v + f32(c)).astype(f32)
        return r

    x = np.asarray(x, dtype=f32)
    t = np.abs(x)
    small = (x.astype(np.float64) * horner(SMALL, (x * x).astype(f32)) + 0.5).astype(f32)
    q = np.exp2(horner(LARGE, (t - f32(SHIFT)).astype(f32)).astype(np.float64)).astype(f32)
    q = np.where(t < f32(TAIL), q, f32(0))
    large = np.where(x > 0, (f32(1) - q).astype(f32), q)
    return np.where(t < f32(SPLIT), small, large).astype(f32)
