"""Triton backend of the pointwise block (``ops/pointwise_block.py`` holds the op's contract).

A 1x1 conv is a GEMM in the [M = N*H*W, C] view of the activations. One strided GEMM kernel
(``_gemm_kernel``) with prologue and epilogue switches serves every launch:

* training forward: ``gemm(stats=True)``: p = r W^T + b, whose epilogue stores p and the per-tile
  BatchNorm statistics of act(p) (the [3, T, C] partials of ``ops/batchnorm.py``); ``finalize``;
  ``apply`` (``_apply_kernel``) writes z = act(p) * s + t.
* eval without grad: ``gemm_apply``, one GEMM whose epilogue writes z (read r, write z).
* backward: ``grad_sums`` (``_bn_bwd_kernel``, reduction pass over (dz, p)); ``input_grad``: the
  pass that materializes dp = act'(p) * BN_bwd(dz) once with per-program sums of dp (db), then
  two GEMMs with the same kernel: dr = dp W and dW = dp^T r (split-K with a fixed-order
  reduction when the output has too few tiles to fill the GPU).

Whole-layer fusion (design.md 3.3, ``ops/prologue.py``): ``linear(..., prologue=Operand)`` and
``input_grad(..., prologue=Operand)`` build r = act(a)*s1 + t1 + residual' on load (the forward's A
operand; the weight gradient's B operand) instead of reading a stored r; ``_build_operand`` rounds as
``operand_reference`` does.

All reductions add tiles in a fixed order (``common.sum_rows``; no atomics), so results are
bitwise reproducible. The GEMM reads every operand through strides, so NCHW, channels_last and
strided views are read in place (no copies): the pixel index m of an [N, C, H, W] tensor is
decomposed into (n, h, w) with the fewest dims its strides allow (``_Axis``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..alloc import empty, empty_output
from ..batchnorm import MEAN, RSTD, SCALE, SHIFT
from ..prologue import ACT_NAME, Affine, Operand
from .activation import act_both, act_fwd, act_grad
from .batchnorm import finalize  # noqa: F401  (part of this backend's contract)
from ...backends import log_event
from .common import Autotuner, interpreting, num_sms, static_active, sum_rows

# ====================================================================== Triton kernels


@triton.jit
def _offsets(idx, D1, D2, S0, S1, S2, DIMS: tl.constexpr):
    """int64 element offsets of the indices ``idx`` along an axis stored as DIMS strided dims.

    DIMS == 1: idx * S2; 2: (idx // D2, idx % D2); 3: (idx // (D1 D2), idx // D2 % D1, idx % D2).
    """
    idx = idx.to(tl.int64)
    if DIMS == 1:
        return idx * S2
    elif DIMS == 2:
        return (idx // D2) * S1 + (idx % D2) * S2
    else:
        return (idx // (D1 * D2)) * S0 + ((idx // D2) % D1) * S1 + (idx % D2) * S2

@triton.jit
def _gemm_kernel(
        a_ptr, b_ptr, c_ptr,
        bias_ptr, scale_ptr, shift_ptr, part_ptr,  # epilogue inputs / statistics output
        pro_scale_ptr, pro_shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr,  # prologue inputs (design.md 3.3)
        I, J, K, k_per_split, part_plane,  # part_plane = T * J, one plane of the partials
        a_d1, a_d2, a_s0, a_s1, a_s2, stride_ak,  # A[i, k] at offsets(i) + k * stride_ak
        b_d1, b_d2, b_s0, b_s1, b_s2, stride_bj,  # B[k, j] at offsets(k) + j * stride_bj
        c_d1, c_d2, c_s0, c_s1, c_s2, stride_cj, stride_csplit,  # C[i, j] (+ split * stride_csplit)
        r_d1, r_d2, r_s0, r_s1, r_s2, stride_rc,  # residual[pixel, channel] at offsets(pixel) + channel * stride_rc
        A_DIMS: tl.constexpr, B_DIMS: tl.constexpr, C_DIMS: tl.constexpr,
        PRO_ACT: tl.constexpr, PRO_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, PRO_B: tl.constexpr,
        RES_DIMS: tl.constexpr, RES_ACT: tl.constexpr, RES_AFFINE: tl.constexpr,
        HAS_BIAS: tl.constexpr, STATS: tl.constexpr, APPLY: tl.constexpr, ACT: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EPI_SPLIT: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr):
    """C = A' B' (+ epilogue), fp32 accumulation, with an optional operand prologue (design.md 3.3).

    Prologue (``_build_operand``; all switches off: A' = A, B' = B): one operand, whose pixel index
    runs along one GEMM axis and channel index along the other, is built on load as
    affine(v) + res', affine(v) = act(v)*s[c] + t[c] (PRO_ACT >= 0, PRO_AFFINE), res' =
    act(res)*rs[c] + rt[c] (RES_ACT, RES_AFFINE) or res (HAS_RES). PRO_B False: A' (pixels along I,
    channels along K: the forward); PRO_B True: B' (pixels along K, channels along J: the weight
    gradient's r), its per-channel vectors loaded once per program. RES_DIMS 0: the residual shares the
    operand's offsets; 1-3: it is read through its own pixel axis (r_*, ``_offsets``) and stride_rc.

    Epilogue switches: HAS_BIAS adds bias[j]; STATS writes per-tile (count, mean, M2) of
    act(C) per column into partials [3, cdiv(I, BLOCK_I), J]; APPLY stores act(C)*scale[j]+shift[j]
    instead of C. The stored C is what statistics and activation see (rounded to C's dtype), so a
    later pass that re-reads C computes the same values. Program axis 1 splits K (split-K).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_i = tl.cdiv(I, BLOCK_I)
    num_j = tl.cdiv(J, BLOCK_J)
    # grouped ordering: GROUP_I row tiles share the B columns they read while those sit in L2
    group = GROUP_I * num_j
    first_i = (pid // group) * GROUP_I
    group_rows = tl.minimum(num_i - first_i, GROUP_I)
    pid_i = first_i + (pid % group) % group_rows
    pid_j = (pid % group) // group_rows

    ri = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    rk = tl.arange(0, BLOCK_K)
    mask_i = ri < I
    mask_j = rj < J
    a_rows = _offsets(ri, a_d1, a_d2, a_s0, a_s1, a_s2, A_DIMS)
    b_cols = rj.to(tl.int64) * stride_bj

    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    if HAS_BIAS:  # the accumulator starts at the bias: no per-column vector held through the epilogue
        acc += tl.load(bias_ptr + rj, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    if PRO_ACT >= 0 or PRO_AFFINE or HAS_RES:
        if PRO_B:  # B's channels run along J: the per-channel vectors are the same for every K step
            s, t, rs, rt = _channel_vectors(rj, mask_j, pro_scale_ptr, pro_shift_ptr, res_scale_ptr,
                                            res_shift_ptr, PRO_AFFINE, HAS_RES and RES_AFFINE)
            if HAS_RES and RES_DIMS > 0:
                res_cols = rj.to(tl.int64) * stride_rc
        elif HAS_RES and RES_DIMS > 0:
            res_rows = _offsets(ri, r_d1, r_d2, r_s0, r_s1, r_s2, RES_DIMS)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < k_hi
        mask_a = mask_i[:, None] & mask_k[None, :]
        a_off = a_rows[:, None] + kk.to(tl.int64)[None, :] * stride_ak
        a = tl.load(a_ptr + a_off, mask=mask_a, other=0.0)
        if (PRO_ACT >= 0 or PRO_AFFINE or HAS_RES) and not PRO_B:
            s, t, rs, rt = _channel_vectors(kk, mask_k, pro_scale_ptr, pro_shift_ptr, res_scale_ptr,
                                            res_shift_ptr, PRO_AFFINE, HAS_RES and RES_AFFINE)
            res = a
            if HAS_RES:
                if RES_DIMS > 0:
                    res = tl.load(res_ptr + res_rows[:, None] + kk.to(tl.int64)[None, :] * stride_rc, mask=mask_a,
                                  other=0.0)
                else:  # the residual shares A's layout
                    res = tl.load(res_ptr + a_off, mask=mask_a, other=0.0)
            a = _build_operand(a, mask_a, s, t, res, rs, rt, PRO_ACT, PRO_AFFINE, HAS_RES, RES_ACT, RES_AFFINE)
        b_rows = _offsets(kk, b_d1, b_d2, b_s0, b_s1, b_s2, B_DIMS)
        b = tl.load(b_ptr + b_rows[:, None] + b_cols[None, :], mask=mask_k[:, None] & mask_j[None, :],
                    other=0.0)
        if (PRO_ACT >= 0 or PRO_AFFINE or HAS_RES) and PRO_B:
            mask_b = mask_k[:, None] & mask_j[None, :]
            res = b
            if HAS_RES:
                if RES_DIMS > 0:
                    res_rows = _offsets(kk, r_d1, r_d2, r_s0, r_s1, r_s2, RES_DIMS)
                    res = tl.load(res_ptr + res_rows[:, None] + res_cols[None, :], mask=mask_b, other=0.0)
                else:  # the residual shares B's layout
                    res = tl.load(res_ptr + b_rows[:, None] + b_cols[None, :], mask=mask_b, other=0.0)
            b = _build_operand(b, mask_b, s, t, res, rs, rt, PRO_ACT, PRO_AFFINE, HAS_RES, RES_ACT, RES_AFFINE)
        if DOT_F32:  # the interpreter's bf16 dot is wrong (gpu.md); bf16 products are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    c_rows = _offsets(ri, c_d1, c_d2, c_s0, c_s1, c_s2, C_DIMS) + split.to(tl.int64) * stride_csplit
    # the epilogue in EPI_SPLIT column blocks: fewer registers live at a time (2 blocks of 8 warps per SM)
    rj0 = pid_j * BLOCK_J + tl.arange(0, BLOCK_J // EPI_SPLIT)
    ep = (ri, c_rows, pid_i, mask_i, c_ptr, scale_ptr, shift_ptr, part_ptr, I, J, part_plane, stride_cj)
    if EPI_SPLIT == 1:
        _epilogue(acc, rj0, *ep, STATS, APPLY, ACT, BLOCK_I)
    else:
        acc0, acc1 = _halves(acc, BLOCK_I, BLOCK_J)
        if EPI_SPLIT == 2:
            _epilogue(acc0, rj0, *ep, STATS, APPLY, ACT, BLOCK_I)
            _epilogue(acc1, rj0 + BLOCK_J // 2, *ep, STATS, APPLY, ACT, BLOCK_I)
        else:  # 4
            q0, q1 = _halves(acc0, BLOCK_I, BLOCK_J // 2)
            _epilogue(q0, rj0, *ep, STATS, APPLY, ACT, BLOCK_I)
            _epilogue(q1, rj0 + BLOCK_J // 4, *ep, STATS, APPLY, ACT, BLOCK_I)
            q2, q3 = _halves(acc1, BLOCK_I, BLOCK_J // 2)
            _epilogue(q2, rj0 + BLOCK_J // 2, *ep, STATS, APPLY, ACT, BLOCK_I)
            _epilogue(q3, rj0 + 3 * (BLOCK_J // 4), *ep, STATS, APPLY, ACT, BLOCK_I)


@triton.jit
def _channel_vectors(ch, mask_ch, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr, AFFINE: tl.constexpr,
                     RES_AFFINE: tl.constexpr):
    """(s, t, rs, rt) at channels ``ch`` as float32 (0 where a switch is off: placeholders never read)."""
    s = 0.0
    t = 0.0
    rs = 0.0
    rt = 0.0
    if AFFINE:
        s = tl.load(scale_ptr + ch, mask=mask_ch, other=0.0).to(tl.float32)
        t = tl.load(shift_ptr + ch, mask=mask_ch, other=0.0).to(tl.float32)
    if RES_AFFINE:
        rs = tl.load(res_scale_ptr + ch, mask=mask_ch, other=0.0).to(tl.float32)
        rt = tl.load(res_shift_ptr + ch, mask=mask_ch, other=0.0).to(tl.float32)
    return s, t, rs, rt


@triton.jit
def _build_operand(v, mask, s, t, res, rs, rt, ACT: tl.constexpr, AFFINE: tl.constexpr, HAS_RES: tl.constexpr,
                   RES_ACT: tl.constexpr, RES_AFFINE: tl.constexpr):
    """One operand tile [rows, channels] as ``prologue.operand_reference`` rounds it: affine(v) =
    act(v)*s + t in float32, plus (HAS_RES) the residual term, itself rounded to the residual's dtype
    (res_act(res)*rs + rt, or res as loaded: a stored z), the sum rounded once to v's dtype; 0 outside
    ``mask`` (the padding lanes must stay 0: act(0)*s + t need not be). s, t, rs, rt: per channel (axis 1)."""
    g = v.to(tl.float32)
    if ACT >= 0:
        g = act_fwd(g, ACT)
    if AFFINE:
        g = g * s[None, :] + t[None, :]
    if HAS_RES:
        if RES_ACT >= 0 or RES_AFFINE:
            h = res.to(tl.float32)
            if RES_ACT >= 0:
                h = act_fwd(h, RES_ACT)
            if RES_AFFINE:
                h = h * rs[None, :] + rt[None, :]
            res = h.to(res.dtype)
        g += res.to(tl.float32)
    return tl.where(mask, g, 0.0).to(v.dtype)


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Columns [0, COLS/2) and [COLS/2, COLS) of the [ROWS, COLS] block ``x``."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, rj, ri, c_rows, pid_i, mask_i, c_ptr, scale_ptr, shift_ptr, part_ptr, I, J, part_plane, stride_cj,
              STATS: tl.constexpr, APPLY: tl.constexpr, ACT: tl.constexpr, BLOCK_I: tl.constexpr):
    """Store one block of columns ``rj`` of the fp32 accumulator (bias already in): C, or (APPLY)
    act(C)*scale + shift; with STATS also the per-column statistics of act(C) into the partials.

    The stored C is what statistics and activation see (rounded to C's dtype), so a later pass that
    re-reads C computes the same values. C is stored first: its registers are then free.
    """
    mask_j = rj < J
    mask = mask_i[:, None] & mask_j[None, :]
    out_ty = c_ptr.dtype.element_ty
    c_off = c_rows[:, None] + rj.to(tl.int64)[None, :] * stride_cj
    if APPLY:
        p = acc.to(out_ty).to(tl.float32)
        s = tl.load(scale_ptr + rj, mask=mask_j, other=0.0)
        t = tl.load(shift_ptr + rj, mask=mask_j, other=0.0)
        tl.store(c_ptr + c_off, (act_fwd(p, ACT) * s[None, :] + t[None, :]).to(out_ty), mask=mask)
    else:
        p = acc.to(out_ty)
        tl.store(c_ptr + c_off, p, mask=mask)
        if STATS:  # (count, mean, M2) per column, two passes over registers as batchnorm.tile_stats;
            # the count is known without a reduction, and only the row mask matters (masked columns are not stored)
            g = act_fwd(p.to(tl.float32), ACT)
            n = tl.minimum(I - pid_i * BLOCK_I, BLOCK_I).to(tl.float32)
            row_ok = mask_i[:, None]
            mean = tl.sum(tl.where(row_ok, g, 0.0), axis=0) / n
            d = tl.where(row_ok, g - mean[None, :], 0.0)
            m2 = tl.sum(d * d, axis=0)
            pofs = pid_i.to(tl.int64) * J + rj
            tl.store(part_ptr + pofs, tl.zeros_like(mean) + n, mask=mask_j)
            tl.store(part_ptr + part_plane + pofs, mean, mask=mask_j)
            tl.store(part_ptr + 2 * part_plane + pofs, m2, mask=mask_j)


@triton.jit
def _apply_kernel(p_ptr, z_ptr, scale_ptr, shift_ptr, M, C,
                  z_d1, z_d2, z_s0, z_s1, z_s2, stride_zc, Z_DIMS: tl.constexpr,
                  ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """z = act(p) * scale + shift; p is a row-major [M, C] matrix, z any layout."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = rc < C
    mask = (rm < M)[:, None] & mask_c[None, :]
    p = tl.load(p_ptr + rm[:, None] * C + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rc, mask=mask_c, other=0.0)
    t = tl.load(shift_ptr + rc, mask=mask_c, other=0.0)
    z = act_fwd(p, ACT) * s[None, :] + t[None, :]
    z_off = _offsets(rm, z_d1, z_d2, z_s0, z_s1, z_s2, Z_DIMS)[:, None] + rc.to(tl.int64)[None, :] * stride_zc
    tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _bn_bwd_kernel(dz_ptr, p_ptr, dp_ptr, part_ptr, mean_ptr, rstd_ptr, coef_ptr,
                   M, C, tiles_per_prog,
                   dz_d1, dz_d2, dz_s0, dz_s1, dz_s2, stride_dzc, DZ_DIMS: tl.constexpr,
                   ACT: tl.constexpr, TRAIN: tl.constexpr, STORE_DP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over (dz, p) for ``tiles_per_prog`` row tiles per program.

    STORE_DP False (reduction pass): partials [T, 2, C] = (sum dz, sum dz * xhat) per program,
    xhat = (act(p) - mean) * rstd, as rstd * sum dz * (act(p) - mean) (one multiply per column, not per
    element; masked lanes hold dz = 0 and need no select).
    STORE_DP True: dp = act'(p) * (k1*(dz - mean_dy) + k2*(act(p) - mean)) with coef [4, C] =
    (k1, k2, mean_dy, mean) (k2 and mean_dy only in training); stores dp (row-major [M, C]) and
    partials [T, C] = sum dp (for db).
    """
    pid_m = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = rc < C
    if STORE_DP:
        k1 = tl.load(coef_ptr + rc, mask=mask_c, other=0.0)
        k2 = tl.load(coef_ptr + C + rc, mask=mask_c, other=0.0)
        mean_dy = tl.load(coef_ptr + 2 * C + rc, mask=mask_c, other=0.0)
        mean = tl.load(coef_ptr + 3 * C + rc, mask=mask_c, other=0.0)
    else:
        mean = tl.load(mean_ptr + rc, mask=mask_c, other=0.0)
        rstd = tl.load(rstd_ptr + rc, mask=mask_c, other=0.0)
    acc0 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    first = pid_m.to(tl.int64) * tiles_per_prog
    for i in range(0, tiles_per_prog):
        rm = (first + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rm < M)[:, None] & mask_c[None, :]
        dz_off = _offsets(rm, dz_d1, dz_d2, dz_s0, dz_s1, dz_s2, DZ_DIMS)[:, None] \
            + rc.to(tl.int64)[None, :] * stride_dzc
        dz = tl.load(dz_ptr + dz_off, mask=mask, other=0.0).to(tl.float32)
        p_off = rm[:, None] * C + rc[None, :]
        p = tl.load(p_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        if STORE_DP:
            if TRAIN:  # with the batch-statistics terms; the subtraction first, as PyTorch does
                g, dact = act_both(p, ACT)  # one CDF / tanh per element gives both
                dg = k1[None, :] * (dz - mean_dy[None, :]) + k2[None, :] * (g - mean[None, :])
            else:
                dact = act_grad(p, ACT)
                dg = k1[None, :] * dz
            dp = dg * dact
            tl.store(dp_ptr + p_off, dp.to(dp_ptr.dtype.element_ty), mask=mask)
            acc0 += tl.where(mask, dp, 0.0)
        else:
            acc0 += dz  # masked lanes loaded as 0
            acc1 += dz * (act_fwd(p, ACT) - mean[None, :])  # sum dz * xhat = rstd * sum dz * (g - mean)
    if STORE_DP:
        tl.store(part_ptr + pid_m.to(tl.int64) * C + rc, tl.sum(acc0, axis=0), mask=mask_c)
    else:
        pofs = pid_m.to(tl.int64) * 2 * C + rc
        tl.store(part_ptr + pofs, tl.sum(acc0, axis=0), mask=mask_c)
        tl.store(part_ptr + pofs + C, tl.sum(acc1, axis=0) * rstd, mask=mask_c)


# ====================================================================== host launchers

@dataclass(frozen=True)
class _Axis:
    """How an index along one GEMM axis maps to element offsets: ``DIMS`` strided dims (see ``_offsets``)."""

    dims: int
    d1: int
    d2: int
    s0: int
    s1: int
    s2: int

    def args(self):
        return (self.d1, self.d2, self.s0, self.s1, self.s2)


def _linear(stride: int) -> _Axis:
    return _Axis(1, 1, 1, 0, 0, stride)


def _pixels(t: Tensor) -> _Axis:
    """The pixel index m = (n*H + h)*W + w of a 4D [N, C, H, W] tensor, read through its strides.

    Dims of size 1 are dropped and neighbours that are contiguous with each other merged, so a
    channels_last tensor is one dim (stride C) and a contiguous NCHW tensor two (N, H*W).
    """
    dims: List[List[int]] = []
    for size, stride in ((t.shape[0], t.stride(0)), (t.shape[2], t.stride(2)), (t.shape[3], t.stride(3))):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if not dims:
        return _linear(0)
    if len(dims) == 1:
        return _linear(dims[0][1])
    if len(dims) == 2:
        return _Axis(2, 1, dims[1][0], 0, dims[0][1], dims[1][1])
    return _Axis(3, dims[1][0], dims[2][0], dims[0][1], dims[1][1], dims[2][1])


@dataclass(frozen=True)
class GemmConfig:
    block_i: int
    block_j: int
    block_k: int
    group_i: int = 8
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: Optional[int] = None
    epi_split: int = 1  # a register cap for ptxas (sm_90: 2 blocks of 8 warps per SM need <= 128)

    def meta(self):
        meta = dict(BLOCK_I=self.block_i, BLOCK_J=self.block_j, BLOCK_K=self.block_k, GROUP_I=self.group_i,
                    num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg:
            meta["maxnreg"] = self.maxnreg
        return meta


# Candidates tried on CUDA, sized for Hopper's 228 KB of shared memory; those that do not fit a
# smaller GPU (or float32 operands) fail to compile and are skipped.
GEMM_CONFIGS = [
    GemmConfig(128, 128, 64, 8, 8, 3),
    GemmConfig(128, 128, 64, 8, 8, 3, maxnreg=128, epi_split=2),
    GemmConfig(128, 128, 64, 8, 8, 3, maxnreg=128, epi_split=4),
    GemmConfig(128, 256, 64, 8, 8, 3),
    GemmConfig(256, 128, 64, 8, 8, 3),
    GemmConfig(128, 128, 64, 8, 4, 4),
    GemmConfig(128, 64, 64, 8, 4, 4),
    GemmConfig(64, 128, 64, 8, 4, 4),
    GemmConfig(64, 64, 64, 8, 4, 4),
    GemmConfig(128, 128, 32, 8, 4, 4),
    GemmConfig(64, 64, 32, 8, 4, 3),
]

_logged_configs = set()


def default_config(dtype: torch.dtype, stats: bool, apply: bool, key: tuple = ()) -> GemmConfig:
    """The one place that chooses the GEMM's launch configuration per shape and epilogue (the
    autotuner, where it runs, starts from it and keeps it unless a candidate measures faster).

    Evidence (sm_90, static: ``convmixer-kernels inspect``, M = 65536, K = N = 1536, bf16): 128x128x64
    tiles, 8 warps (two warpgroups of HGMMA 64x128x16), 3 stages (96 KB of shared memory) run 2 blocks
    per SM when they need at most 128 registers; that halves the issue-bound time of the epilogues.
    The plain GEMM needs ~110 registers as is. The epilogues need a register cap (maxnreg=128) and
    their work in column blocks (``epi_split``): statistics 4 blocks of 32 columns (125 registers, no
    spills; 255 registers with 56 B spilled in one piece), BN apply 2 blocks of 64 (128, no spills).
    128x256 tiles need 232-255 registers with the statistics epilogue (1 block per SM): slower.
    """
    block_k = 32 if dtype == torch.float32 else 64  # 3 stages of 32 KB tiles (fits any GPU since Ampere)
    if stats:
        cfg, why = GemmConfig(128, 128, block_k, 8, 8, 3, maxnreg=128, epi_split=4), "statistics epilogue"
    elif apply:
        cfg, why = GemmConfig(128, 128, block_k, 8, 8, 3, maxnreg=128, epi_split=2), "BN apply epilogue"
    else:
        cfg, why = GemmConfig(128, 128, block_k, 8, 8, 3), "plain epilogue"
    if key not in _logged_configs:
        _logged_configs.add(key)
        log_event(logging.DEBUG, "pointwise_block (triton): GEMM %s for %s (%s)", cfg, key, why)
    return cfg


def _interpreter_config(default: GemmConfig) -> GemmConfig:
    """The interpreter: small tiles (dot needs >= 16), a group of 2 so the grouped ordering is exercised,
    and the epilogues in two column halves where the GPU splits them, so the split epilogue runs in tests."""
    return GemmConfig(16, 16, 16, 2, 4, 1, epi_split=min(default.epi_split, 2))



_tuner = Autotuner("pointwise_block (triton)")


def _pick_config(key: tuple, I: int, J: int, default: GemmConfig, launch, device) -> GemmConfig:
    """The GEMM configuration for ``key`` (shapes, dtypes, layouts, epilogue): benchmarked once per
    key on CUDA and cached; fixed under the interpreter, in deterministic mode or with autotuning off."""
    if interpreting(device):
        return _interpreter_config(default)
    cap_i, cap_j = max(64, triton.next_power_of_2(I)), max(64, triton.next_power_of_2(J))
    cands = [default] + [c for c in GEMM_CONFIGS if c != default and c.block_i <= cap_i and c.block_j <= cap_j]
    return _tuner.pick(key, cands, launch)


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """float32 follows PyTorch's matmul setting (allow_tf32 / float32_matmul_precision)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"  # half types: the value is not used


def gemm(a: Tensor, a_rows: _Axis, stride_ak: int, b: Tensor, b_k: _Axis, stride_bj: int,
         c: Tensor, c_rows: _Axis, stride_cj: int, I: int, J: int, K: int, *,
         bias: Optional[Tensor] = None, stats: bool = False, apply: Optional[Tuple[Tensor, Tensor]] = None,
         act: int = 0, prologue: Optional[dict] = None, split_k: int = 1, stride_csplit: int = 0,
         config: Optional[GemmConfig] = None) -> Optional[Tensor]:
    """Launch ``_gemm_kernel``: C[i, j] = sum_k A'[i, k] B'[k, j] (+ epilogue); returns the partials if ``stats``.

    Layouts are given per axis (``_Axis`` for the axes that may be pixel indices, a plain stride for
    the others). ``prologue`` = dict(act=code or -1, scale=, shift=, residual=, res_act=code or -1,
    res_scale=, res_shift=, res_rows=_Axis, res_stride=, on_b=False), every key optional, builds one
    operand on load (``_build_operand``): A' = act(A) * scale[k] + shift[k] + res'[i, k], or with
    ``on_b`` B' = act(B) * scale[j] + shift[j] + res'[k, j]; res' = res_act(residual) * res_scale +
    res_shift rounded to the residual's dtype, or the residual itself. The residual is read through
    ``res_rows`` (its pixel axis) and ``res_stride`` (its channel stride), or without them in the
    operand's own layout. With ``split_k`` > 1 program axis 1 splits K and split s writes C + s * stride_csplit.
    """
    if a.dtype != b.dtype:
        raise RuntimeError(f"gemm: operand dtypes differ ({a.dtype} and {b.dtype})")
    pro = {k: v for k, v in (prologue or {}).items() if v is not None}
    unknown = set(pro) - _PROLOGUE_KEYS
    if unknown:
        raise ValueError(f"gemm: unknown prologue keys {sorted(unknown)}")
    for pair in (("scale", "shift"), ("res_scale", "res_shift")):
        if (pair[0] in pro) != (pair[1] in pro):
            raise ValueError(f"gemm: prologue {pair[0]} and {pair[1]} go together")
    has_res = "residual" in pro
    res_rows = pro.get("res_rows") if has_res else None
    # the prologue's constexprs (all off: the kernel without a prologue)
    switches = dict(PRO_ACT=pro.get("act", -1), PRO_AFFINE="scale" in pro, HAS_RES=has_res,
                    PRO_B=bool(pro.get("on_b")) and (pro.get("act", -1) >= 0 or "scale" in pro or has_res),
                    RES_DIMS=res_rows.dims if res_rows else 0, RES_ACT=pro.get("res_act", -1) if has_res else -1,
                    RES_AFFINE=has_res and "res_scale" in pro)
    dummy = c
    interp = interpreting(c.device)
    precision = "ieee" if interp else _dot_precision(a.dtype, a.device)
    dot_f32 = interp and a.dtype == torch.bfloat16
    k_per_split, split_k = split_plan(K, split_k)
    parts = {}

    def part_for(cfg: GemmConfig):
        if stats and cfg not in parts:
            parts[cfg] = empty((3, triton.cdiv(I, cfg.block_i), J), dtype=torch.float32, device=c.device)
        return parts.get(cfg)

    def launch(cfg: GemmConfig):
        part = part_for(cfg)
        grid = (triton.cdiv(I, cfg.block_i) * triton.cdiv(J, cfg.block_j), split_k)
        _gemm_kernel[grid](
            a, b, c,
            bias if bias is not None else dummy,
            apply[0] if apply else dummy, apply[1] if apply else dummy,
            part if part is not None else dummy,
            pro.get("scale", dummy), pro.get("shift", dummy), pro.get("residual", dummy),
            pro.get("res_scale", dummy) if switches["RES_AFFINE"] else dummy,
            pro.get("res_shift", dummy) if switches["RES_AFFINE"] else dummy,
            I, J, K, k_per_split, triton.cdiv(I, cfg.block_i) * J,
            *a_rows.args(), stride_ak, *b_k.args(), stride_bj, *c_rows.args(), stride_cj, stride_csplit,
            *(res_rows.args() if res_rows else (0,) * 5), pro.get("res_stride", 0) if res_rows else 0,
            A_DIMS=a_rows.dims, B_DIMS=b_k.dims, C_DIMS=c_rows.dims, **switches,
            HAS_BIAS=bias is not None, STATS=stats, APPLY=apply is not None, ACT=act,
            DOT_F32=dot_f32, PRECISION=precision, EPI_SPLIT=cfg.epi_split, **cfg.meta())

    if config is None:
        res_dt = pro["residual"].dtype if has_res else None
        key = (I, J, K, a.dtype, c.dtype, a_rows.dims, b_k.dims, c_rows.dims, stride_ak == 1, stride_bj == 1,
               stride_cj == 1, bias is not None, stats, apply is not None, act,
               tuple(sorted(switches.items())), res_dt, bool(res_rows) and pro.get("res_stride") == 1, split_k,
               precision, a.device.index)
        default = default_config(a.dtype, stats, apply is not None, key)
        config = _pick_config(key, I, J, default, launch, c.device)
    launch(config)
    return part_for(config)


_PROLOGUE_KEYS = {"act", "scale", "shift", "residual", "res_act", "res_scale", "res_shift", "res_rows", "res_stride",
                  "on_b"}


def split_plan(K: int, split_k: int) -> Tuple[int, int]:
    """(K per split, number of splits) for about ``split_k`` splits; each split is a multiple of 64
    (of every BLOCK_K), so only the last one is ragged."""
    if split_k <= 1:
        return K, 1
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), 64) * 64
    return k_per_split, triton.cdiv(K, k_per_split)




# 8 warps over a 32x128 tile: 16 elements per thread, ~100 registers, 2 blocks = 16 warps per SM (sm_90,
# static: with 4 warps 166 registers, 12 warps per SM, the erf-bound passes issue at 3/4 of the rate)
_ROWWISE_WARPS = 8


def _rowwise_config(M: int, C: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, programs along M, row tiles per program) for the row-wise passes: enough
    programs to fill the GPU, few enough that the [T, C] partials stay small."""
    if interpreting(device):
        block_m, block_c, tiles_per_prog = 8, 16, 2  # > 1 tile per program exercises the loop
        return block_m, block_c, triton.cdiv(M, block_m * tiles_per_prog), tiles_per_prog
    block_m, block_c = 32, min(128, triton.next_power_of_2(max(C, 16)))
    row_tiles = triton.cdiv(M, block_m)
    progs = max(1, min(row_tiles, 8 * num_sms(device) // triton.cdiv(C, block_c)))
    tiles_per_prog = triton.cdiv(row_tiles, progs)
    return block_m, block_c, triton.cdiv(row_tiles, tiles_per_prog), tiles_per_prog


def _conv_weight(weight: Tensor) -> Tuple[int, int, int, int]:
    """(Cout, Cin, stride over Cout, stride over Cin) of a [Cout, Cin, 1, 1] conv weight."""
    return weight.shape[0], weight.shape[1], weight.stride(0), weight.stride(1)


# tensor-core FLOPs per byte of DRAM traffic on the GPUs this package targets (H100/H200: 788 TFLOP/s bf16
# dense over 4.3 TB/s): what one extra fp32 partial write and read costs in GEMM time
_FLOP_PER_BYTE = 180.0


def _gemm_slots(device: torch.device, cfg: GemmConfig, elem: int) -> int:
    """Blocks of ``cfg`` resident on the GPU at once (by shared memory; at most 2 of 8 warps per SM)."""
    smem = cfg.num_stages * (cfg.block_i + cfg.block_j) * cfg.block_k * elem + 1024
    if static_active() is not None or device.type != "cuda":
        per_sm = 228 * 1024  # sm_90
    else:
        per_sm = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", 228 * 1024)
    per_block = max(1, min(2048 // (32 * cfg.num_warps), per_sm // smem, 2))
    return per_block * num_sms(device)


def split_k_for(I: int, J: int, K: int, cfg: GemmConfig, slots: int, max_split: int = 32) -> int:
    """Splits of K for an [I, J] output with a long K (the weight gradient: K = M): the count that
    minimizes (waves of blocks x work per block) + the fp32 partials' write and read, so the blocks
    fill whole waves (ties: fewer splits). At M = 65536, 1536x1536, 264 slots: 9 splits
    (1296 blocks = 4.9 waves) instead of 2 (288 blocks = 1.09 waves, the second wave 9% full)."""
    tiles = triton.cdiv(I, cfg.block_i) * triton.cdiv(J, cfg.block_j)
    best, best_cost = 1, None
    for want in range(1, max_split + 1):
        kps, split = split_plan(K, want)
        if want > 1 and split != want:
            continue
        waves = triton.cdiv(tiles * split, slots)
        cost = waves * slots * 2.0 * cfg.block_i * cfg.block_j * kps
        if split > 1:
            cost += 8.0 * split * I * J * _FLOP_PER_BYTE
        if best_cost is None or cost < best_cost * (1 - 1e-9):
            best, best_cost = split, cost
    return best


def _split_k(I: int, J: int, K: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many K splits the weight-gradient GEMM needs to fill the GPU (K = M is long, the output small)."""
    if interpreting(device):
        return 2 if K > 64 else 1  # exercised by the tests
    cfg = default_config(dtype, False, False)
    return split_k_for(I, J, K, cfg, _gemm_slots(device, cfg, torch.empty((), dtype=dtype).element_size()),
                       max_split=max(1, min(64, K // 1024)))


def _apply_block(M: int, cout: int, device) -> Tuple[int, int]:
    return (8, 16) if interpreting(device) else (64, min(128, triton.next_power_of_2(max(cout, 16))))


# ====================================================================== the contract (ops/pointwise_block.py)


def unsupported(**config) -> Optional[str]:
    """Limits of this backend beyond the contract's own checks: none (any strides, int64 offsets)."""
    return None


def _affine_args(affine: Affine, channels: int, what: str) -> Tuple[int, Tensor, Tensor]:
    """(act code, scale, shift) of a prologue ``Affine`` over ``channels`` channels (contiguous rows)."""
    fin = affine.finalized
    if fin.dim() != 2 or fin.shape[0] < 6 or fin.shape[1] != channels:
        raise RuntimeError(f"pointwise_block (triton): the prologue's {what} has finalized statistics of shape "
                           f"{tuple(fin.shape)}, expected [6, {channels}]")
    if affine.act not in ACT_NAME:
        raise RuntimeError(f"pointwise_block (triton): the prologue's {what} has unknown activation code {affine.act}")
    return affine.act, fin[SCALE].contiguous(), fin[SHIFT].contiguous()


def _operand_prologue(operand: Optional[Operand], x: Tensor, on_b: bool) -> Optional[dict]:
    """``gemm``'s prologue dict for r = ``operand_reference(x, operand)`` built on load of x (the A operand,
    or with ``on_b`` the B operand); the residual is read through its own strides where they differ from x's."""
    if operand is None:
        return None
    cin = x.shape[1]
    pro = dict(on_b=on_b)
    if operand.affine is not None:
        pro["act"], pro["scale"], pro["shift"] = _affine_args(operand.affine, cin, "affine")
    res = operand.residual
    if res is None:
        if operand.residual_affine is not None:
            raise RuntimeError("pointwise_block (triton): the prologue has a residual_affine but no residual")
        return pro
    if tuple(res.shape) != tuple(x.shape) or res.device != x.device:
        raise RuntimeError(f"pointwise_block (triton): the prologue's residual of shape {tuple(res.shape)} on "
                           f"{res.device} does not match the input of shape {tuple(x.shape)} on {x.device}")
    if not res.is_floating_point():
        raise RuntimeError(f"pointwise_block (triton): the prologue's residual is {res.dtype}, not a float tensor")
    pro["residual"] = res
    rows = _pixels(res)
    if rows != _pixels(x) or res.stride(1) != x.stride(1):  # its own layout: read through its own strides
        pro["res_rows"], pro["res_stride"] = rows, res.stride(1)
    if operand.residual_affine is not None:
        pro["res_act"], pro["res_scale"], pro["res_shift"] = _affine_args(operand.residual_affine, cin,
                                                                          "residual_affine")
    return pro


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, stats: bool,
           prologue: Optional[Operand] = None):
    """p = r W^T + b as a row-major [M, Cout] matrix, and (``stats``) the [3, T, Cout] partials of act(p).

    r = x, or with ``prologue`` r = ``operand_reference(x, prologue)`` built as the GEMM loads its A operand
    (``ops/prologue.py``: r = act(x)*s + t + residual', never stored)."""
    N, _, H, W = x.shape
    cout, cin, s_wo, s_wi = _conv_weight(weight)
    M = N * H * W
    p = empty((M, cout), dtype=x.dtype, device=x.device)
    part = gemm(x, _pixels(x), x.stride(1), weight, _linear(s_wi), s_wo, p, _linear(cout), 1, M, cout, cin,
                bias=bias, stats=stats, act=act, prologue=_operand_prologue(prologue, x, on_b=False))
    return p, part


def apply(p: Tensor, x: Tensor, finalized: Tensor, act: int) -> Tensor:
    """z = act(p) * scale + shift in x's memory format (p: [M, Cout] row-major)."""
    M, cout = p.shape
    z = empty_output(x, cout)
    block_m, block_c = _apply_block(M, cout, x.device)
    zr = _pixels(z)
    _apply_kernel[(triton.cdiv(M, block_m), triton.cdiv(cout, block_c))](
        p, z, finalized[SCALE], finalized[SHIFT], M, cout, *zr.args(), z.stride(1), Z_DIMS=zr.dims,
        ACT=act, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_ROWWISE_WARPS)
    return z


def linear_apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], finalized: Tensor, act: int) -> Tensor:
    """Eval without a backward: z = act(r W^T + b) * scale + shift in one GEMM (read r, write z)."""
    N, _, H, W = x.shape
    cout, cin, s_wo, s_wi = _conv_weight(weight)
    z = empty_output(x, cout)
    gemm(x, _pixels(x), x.stride(1), weight, _linear(s_wi), s_wo, z, _pixels(z), z.stride(1), N * H * W, cout, cin,
         bias=bias, apply=(finalized[SCALE], finalized[SHIFT]), act=act)
    return z


def grad_sums(dz: Tensor, p: Tensor, stats: Tensor, act: int) -> Tensor:
    """[2, Cout] float32: (sum dz, sum dz * xhat) per channel."""
    M, cout = p.shape
    dz_rows = _pixels(dz)
    block_m, block_c, progs, tiles_per_prog = _rowwise_config(M, cout, p.device)
    part = empty((progs, 2, cout), dtype=torch.float32, device=p.device)
    _bn_bwd_kernel[(progs, triton.cdiv(cout, block_c))](
        dz, p, p, part, stats[MEAN], stats[RSTD], stats, M, cout, tiles_per_prog, *dz_rows.args(), dz.stride(1),
        DZ_DIMS=dz_rows.dims, ACT=act, TRAIN=True, STORE_DP=False, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=_ROWWISE_WARPS)
    return sum_rows(part)


def input_grad(dz: Tensor, p: Tensor, x: Tensor, weight: Tensor, coef: Tensor, act: int, train: bool,
               need_dx: bool, need_dw: bool, need_db: bool, prologue: Optional[Operand] = None):
    """(dx, dW, db): dp = act'(p) * (k1*(dz - mean_dy) + k2*(act(p) - mean)) materialized once (coef = [4, Cout]),
    then dx = dp W and dW = dp^T r; a gradient not asked for is an empty tensor.

    r = x, or with ``prologue`` r = ``operand_reference(x, prologue)``, built as the weight-gradient GEMM
    loads its B operand (channels along J: the per-channel vectors are loaded once per program). dx is
    the gradient with respect to r either way."""
    M, cout = p.shape
    cin = weight.shape[1]
    _, _, s_wo, s_wi = _conv_weight(weight)
    dev = x.device
    dz_rows = _pixels(dz)
    block_m, block_c, progs, tiles_per_prog = _rowwise_config(M, cout, dev)
    dp = empty((M, cout), dtype=x.dtype, device=dev)
    part_db = empty((progs, cout), dtype=torch.float32, device=dev)
    _bn_bwd_kernel[(progs, triton.cdiv(cout, block_c))](
        dz, p, dp, part_db, coef, coef, coef, M, cout, tiles_per_prog, *dz_rows.args(), dz.stride(1),
        DZ_DIMS=dz_rows.dims, ACT=act, TRAIN=train, STORE_DP=True, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=_ROWWISE_WARPS)
    db = sum_rows(part_db, dtype=weight.dtype) if need_db else x.new_empty(0)
    dx = x.new_empty(0)
    if need_dx:  # dr[m, cin] = sum_cout dp[m, cout] weight[cout, cin]
        dx = empty_output(x, cin)
        gemm(dp, _linear(cout), 1, weight, _linear(s_wo), s_wi, dx, _pixels(dx), dx.stride(1), M, cin, cout)
    dw = x.new_empty(0)
    if need_dw:  # dW[cout, cin] = sum_m dp[m, cout] x[m, cin]: K = M, split when the output is small
        split = _split_k(cout, cin, M, x.dtype, dev)
        pro = _operand_prologue(prologue, x, on_b=True)
        if split == 1:
            dw = empty((cout, cin), dtype=weight.dtype, device=dev)
            gemm(dp, _linear(1), cout, x, _pixels(x), x.stride(1), dw, _linear(cin), 1, cout, cin, M, prologue=pro)
        else:
            _, split = split_plan(M, split)
            part_w = empty((split, cout, cin), dtype=torch.float32, device=dev)
            gemm(dp, _linear(1), cout, x, _pixels(x), x.stride(1), part_w, _linear(cin), 1, cout, cin, M,
                 prologue=pro, split_k=split, stride_csplit=cout * cin)
            dw = sum_rows(part_w, dtype=weight.dtype)
        dw = dw.view(weight.shape)
    return dx, dw, db
