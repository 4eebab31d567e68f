"""Tensor-core depthwise conv for large kernels (k >= 7, bf16/fp16), issue 11 (the tensor-core part).

Wired into the Triton backend by ``ops/triton/depthwise.py``'s ``_path`` (the one place the path is chosen,
logged; ``CONVMIXER_KERNELS_DW_PATH`` forces one): its ``conv_stats``, ``conv_apply`` and ``input_grad``
delegate here when ``choose_path`` says "tc" and no input-side prologue is given (these kernels have none);
``tc_unsupported`` says when they cannot run. The launchers keep the contract of ``ops/triton/depthwise.py``
(``ops/depthwise_block.py``); ``finalize``, ``apply`` and ``grad_sums`` are that file's.

The idea. Per channel, a 2-D conv is a sum over kernel rows i of 1-D row convolutions, and a 1-D
conv of a W-tile is a GEMM with a banded (Toeplitz) matrix:

    a[r, w0 + v] = sum_i sum_u X_i[r, u0 + u] * T_i[u, v],   T_i[u, v] = w[i, (u0 + u) - (w0 + v) + PL]

(zero outside 0 <= j < KW), r = (n, h) the GEMM's rows (M = N*H), X_i[r, q] = x[n, h + i - PT, q]
(zero outside the map), u over the input columns the W-tile reaches, clipped to the map (at W = 32,
BW = 32 the window is the whole row: 32 columns, 32/KW redundant multiply-adds, 1.03x at k = 31). A
program is (channel block of BC channels, BM rows x BW columns): one batched (3-D) ``tl.dot`` per
(kernel row, window chunk) of [BC, BM, KC] x [BC, KC, BW], fp32 accumulation, channels as the batch
dimension so that the [BC, BM, KC] input tile is a coalesced load in channels_last (BC channels
contiguous) and in NCHW (KC columns contiguous) alike. T_i is gathered from a zero-padded weight
table ``[C, KH, L]`` (x's dtype) so its loads need no masks. Kernel rows that miss the map for every
row of the block are skipped.

Kernels:

* ``_tc_conv_kernel``: out = conv(x) + bias (+ res) in x's dtype; STATS: the per-tile (count, mean, M2)
  of act(out) into partials [3, T, C] (T = tiles, ``ops/batchnorm.py``'s format); APPLY (eval): y =
  act(a) * scale + shift + x. The input gradient is the same kernel: dx = dy + conv^T(da) is the
  correlation of da with the flipped kernel and transposed padding (KH-1-PT, KW-1-PL) (for even k
  the padding flips side), RES adds dy before the one rounding.
EVEN (every tile full: C, N*H, W multiples of the tile) drops the channel/row/column masks (the tap rows'
row masks stay, one unsigned compare) and sums the statistics over the 3-D tile; DENSE (W <= BW = KC) reads
the whole row in one chunk (both kernels): the window-chunk loop is compiled out (one dot per tap row).

* ``_tc_wgrad_kernel``: dw[c, i, j] = sum da[n,c,h,w] x[n,c,h+i-PT,w+j-PL] as D_i = X_i^T @ da over
  rows (the rows are the GEMM's reduction), [BC, KC, BW] per (kernel row, window chunk, W-tile),
  then dw[i, j] = sum of D_i's diagonal u - v = j - PL (a banded sum, once per program). Program
  (channel block, kernel row, row split); the splits' partials are summed by ``common.sum_rows`` in
  a fixed order (no atomics): deterministic. db from the i = 0 programs (standalone ``weight_grad``) or
  from the da kernel (``input_grad``).
* ``_da_kernel``: da = act'(a) * (k1*(dy - mean_dy) + k2*(act(a) - mean)), materialized once (x's
  dtype), as the CUDA-core backward's ``_input_grad_kernel`` stores it.

Under the interpreter a bf16 ``tl.dot`` is wrong (gpu.md): with DOT_F32 the operands are upcast to
fp32 before the dot. bf16/fp16 products are exact in fp32 and the accumulation is fp32 either way, so
the interpreter tests the same math (the order of the fp32 sums may differ).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..alloc import empty, empty_output
from ..batchnorm import SCALE, SHIFT
from .activation import act_fwd, act_grad
from .batchnorm import tile_stats
from .common import interpreting, needs_int64, num_sms, p2, sum_rows
from .depthwise import TileConfig, _offsets, _strides, _tile, default_config  # noqa: F401
from .depthwise import grad_sums  # noqa: F401 (part of the contract)
from .batchnorm import finalize  # noqa: F401  (part of the contract)
from .depthwise import apply  # noqa: F401  (part of the contract: y = act(a)*s + t + x)

MIN_K = 2  # at k = 1 the CUDA-core path's 1 FMA per tap beats a 32-wide Toeplitz band (choose_path)


# ====================================================================== kernels


@triton.jit
def _to(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype``. The interpreter truncates fp32 -> bf16 (its cast has no rounding mode):
    there the round-to-nearest-even is done on the bits first, so the truncation that follows is exact and
    the interpreter stores what a GPU's cvt.rn would."""
    if INTERP:
        if dtype == tl.bfloat16:
            b = v.to(tl.int32, bitcast=True)
            b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
            v = b.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _tc_conv_kernel(x_ptr, tab_ptr, b_ptr, res_ptr, out_ptr, y_ptr, scale_ptr, shift_ptr, part_ptr,
                    C, H, W, M, tiles_w, T,
                    sxn, sxc, sxh, sxw, son, soc, soh, sow, srn, src, srh, srw,
                    KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr, L: tl.constexpr,
                    OFF: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, RES: tl.constexpr,
                    STATS: tl.constexpr, APPLY: tl.constexpr, STORE: tl.constexpr, DENSE: tl.constexpr,
                    EVEN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr, KC: tl.constexpr,
                    DOT_F32: tl.constexpr, INT64: tl.constexpr):
    """out[n, c, h, w0+v] = sum_i X_i @ T_i (+ bias, + res) over one tile of BC channels x BM rows (n, h)
    x BW columns; see the module docstring. ``tab`` [cblocks*BC, KH, L] holds w[c, i, j] at
    OFF + j, zeros elsewhere (T's gather is mask-free); DENSE (W <= BW = KC: one tile, one chunk per row):
    ``tab`` is the Toeplitz matrices themselves, [cblocks*BC, KH, KC, BW] (contiguous vector loads). STATS: (count, mean, M2) of act(out) per
    channel into partials [3, T, C] at tile t. APPLY: y = act(out)*scale + shift + x (eval; out only
    if STORE). EVEN (C % BC == 0, M % BM == 0, W % BW == 0): no channel, row or column masks (the tap rows'
    own row masks stay). DENSE: one dot per tap row, no window-chunk loop."""
    cb = tl.program_id(0)
    t = tl.program_id(1)
    mt = t // tiles_w
    w0 = (t % tiles_w) * BW
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    m = mt * BM + tl.arange(0, BM)
    mmask = m < M
    n = m // H
    h = m % H
    v = w0 + tl.arange(0, BW)
    vmask = v < W
    if INT64:
        n = n.to(tl.int64)
        h = h.to(tl.int64)
        c = c.to(tl.int64)
    # tap rows that reach the map for some row of the block (rows h_lo..h_hi, whole images when it spans two)
    m0 = mt * BM
    m1 = tl.minimum(m0 + BM, M) - 1
    same = (m0 // H) == (m1 // H)
    h_lo = tl.where(same, m0 % H, 0)
    h_hi = tl.where(same, m1 % H, H - 1)
    i_lo = tl.maximum(PT - h_hi, 0)
    i_hi = tl.minimum(H + PT - h_lo, KH)
    # input columns the tile's taps reach, clipped to the map
    q_lo = tl.maximum(w0 - PL, 0)
    q_hi = tl.minimum(w0 + (BW - 1 + KW - PL), W)
    ku = tl.arange(0, KC)
    kv = tl.arange(0, BW)
    band = ku[:, None] - kv[None, :]  # [KC, BW]
    x_c = x_ptr + (c * sxc)[:, None, None]
    if DENSE:
        t_c = tab_ptr + (c * (KH * KC * BW))[:, None, None]
    else:
        t_c = tab_ptr + (c * (KH * L))[:, None, None]
    acc = tl.zeros((BC, BM, BW), dtype=tl.float32)
    if DENSE:  # the whole row in one chunk (u0 = w0 = 0, W <= KC): one dot per tap row, T_i from the dense table
        x_d = x_c + (n * sxn + h * sxh)[None, :, None] + (ku * sxw)[None, None, :]
        t_d = t_c + (ku[:, None] * BW + kv[None, :])[None, :, :]
        for i in range(i_lo, i_hi):
            hh = h + (i - PT)
            if EVEN:
                rmask = hh.to(tl.uint32) < H.to(tl.uint32)  # 0 <= hh < H in one unsigned compare
                xm = rmask[None, :, None]
            else:
                rmask = mmask & (hh >= 0) & (hh < H)
                xm = cmask[:, None, None] & rmask[None, :, None] & (ku < W)[None, None, :]
            # one chunk (q_lo = 0, q_hi = W <= KC): no window-chunk loop
            a_t = tl.load(x_d + (i - PT) * sxh, mask=xm, other=0.0)
            w_t = tl.load(t_d + i * (KC * BW))
            if DOT_F32:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32 ("ieee": no tf32)
                acc = tl.dot(a_t.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a_t, w_t, acc)
    else:
        for i in range(i_lo, i_hi):
            hh = h + (i - PT)
            rmask = mmask & (hh >= 0) & (hh < H)
            x_r = x_c + (n * sxn + hh * sxh)[None, :, None]
            t_r = t_c + i * L + (OFF + PL - w0)
            for u0 in range(q_lo, q_hi, KC):
                u = u0 + ku
                a_t = tl.load(x_r + (u * sxw)[None, None, :],
                              mask=cmask[:, None, None] & rmask[None, :, None] & (u < q_hi)[None, None, :], other=0.0)
                w_t = tl.load(t_r + (u0 + band)[None, :, :])  # T[u, v] = w[i, u0 + u - w0 - v + PL]
                if DOT_F32:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32 ("ieee": no tf32)
                    acc = tl.dot(a_t.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a_t, w_t, acc)
    if EVEN:
        mask = None
    else:
        mask = cmask[:, None, None] & mmask[None, :, None] & vmask[None, None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None, None]
    r_off = (c * src)[:, None, None] + (n * srn + h * srh)[None, :, None] + (v * srw)[None, None, :]
    if RES:  # dx = dy + conv^T(da): the residual's gradient added before the one rounding
        if EVEN:
            acc += tl.load(res_ptr + r_off).to(tl.float32)
        else:
            acc += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    o_off = (c * soc)[:, None, None] + (n * son + h * soh)[None, :, None] + (v * sow)[None, None, :]
    # rounded to the output dtype before any use: statistics, y and the backward see the stored value
    a = _to(acc, out_ptr.dtype.element_ty, DOT_F32)
    if STORE:
        tl.store(out_ptr + o_off, a, mask=mask)
    if STATS:
        g = act_fwd(a.to(tl.float32), ACT)
        if EVEN:  # every pixel of the tile counts: no mask products; sums over the 3-D tile (no reshape)
            count = tl.full((BC,), BM * BW, tl.float32)
            mean = tl.sum(tl.sum(g, axis=2), axis=1) / (BM * BW)
            d = g - mean[:, None, None]
            m2 = tl.sum(tl.sum(d * d, axis=2), axis=1)
        else:
            count, mean, m2 = tile_stats(tl.reshape(g, (BC, BM * BW)), tl.reshape(mask, (BC, BM * BW)), 1)
        p = part_ptr + t * C + c
        tl.store(p, count, mask=cmask)
        tl.store(p + T * C, mean, mask=cmask)
        tl.store(p + 2 * T * C, m2, mask=cmask)
    if APPLY:  # eval: res is x, y shares out's strides
        s = tl.load(scale_ptr + c, mask=cmask, other=0.0)[:, None, None]
        sh = tl.load(shift_ptr + c, mask=cmask, other=0.0)[:, None, None]
        if EVEN:
            xv = tl.load(res_ptr + r_off).to(tl.float32)
        else:
            xv = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        y = act_fwd(a.to(tl.float32), ACT) * s + sh + xv
        tl.store(y_ptr + o_off, _to(y, y_ptr.dtype.element_ty, DOT_F32), mask=mask)


@triton.jit
def _tc_wgrad_kernel(da_ptr, x_ptr, dwp_ptr, dbp_ptr, scratch_ptr, C, H, W, M, rows_per_split, tiles_w,
                     sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
                     KH: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                     BC: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, KC: tl.constexpr,
                     DB: tl.constexpr, DENSE: tl.constexpr, EVEN: tl.constexpr, DOT_F32: tl.constexpr,
                     INT64: tl.constexpr):
    """Partials dw[split, i*KW + j, c] and (DB, i = 0 programs) db[split, c] over rows
    [split*rows_per_split, +rows_per_split) of program (cb, i, split): per W-tile and window chunk,
    D = X_i^T @ da accumulated over the rows in BR-row steps ([BC, KC, BR] x [BC, BR, BW]), then its
    diagonals u0 + u - (w0 + v) + PL = j summed into dw[j] (fixed order, once per chunk, through the program's
    scratch slot of BC*KC*BW fp32). DENSE (W <= BW = KC): one W-tile and one chunk (the whole row), no loops for
    them. EVEN (DENSE, C % BC == 0, H and rows_per_split multiples of BR): no channel, row or column masks (x's
    tap-row mask stays), and each BR-row step lies in one image (n, h from one scalar division)."""
    cb = tl.program_id(0)
    i = tl.program_id(1)
    split = tl.program_id(2)
    cl = tl.arange(0, BC)
    slot = scratch_ptr + ((split * KH + i) * tl.num_programs(0) + cb).to(tl.int64) * (BC * KC * BW)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    if INT64:
        c = c.to(tl.int64)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    ku = tl.arange(0, KC)
    kv = tl.arange(0, BW)
    kr = tl.arange(0, BR)
    jj = tl.arange(0, KWP)
    dwv = tl.zeros((BC, KWP), dtype=tl.float32)
    dbv = tl.zeros((BC,), dtype=tl.float32)
    x_c = x_ptr + (c * sxc)[:, None, None]
    d_c = da_ptr + (c * sdc)[:, None, None]
    if DENSE:  # one W-tile, one chunk: w0 = u0 = 0, the window is the row (no W-tile or window-chunk loop)
        acc = tl.zeros((BC, KC, BW), dtype=tl.float32)
        for r0 in range(first, last, BR):
            m = r0 + kr
            if EVEN:  # the BR rows lie in one image (H % BR == 0): one scalar division per step
                n = tl.zeros((BR,), tl.int32) + r0 // H
                h = (r0 % H) + kr
            else:
                n = m // H
                h = m % H
            if INT64:
                n = n.to(tl.int64)
                h = h.to(tl.int64)
            hh = h + (i - PT)
            if EVEN:
                rmask = hh.to(tl.uint32) < H.to(tl.uint32)  # 0 <= hh < H in one unsigned compare
                xm = rmask[None, None, :]
            else:
                mmask = m < last
                rmask = mmask & (hh >= 0) & (hh < H)
                xm = cmask[:, None, None] & (ku < W)[None, :, None] & rmask[None, None, :]
            xt = tl.load(x_c + (n * sxn + hh * sxh)[None, None, :] + (ku * sxw)[None, :, None], mask=xm, other=0.0)
            d_p = d_c + (n * sdn + h * sdh)[None, :, None] + (kv * sdw)[None, None, :]
            if EVEN:
                d = tl.load(d_p)
            else:
                dm = cmask[:, None, None] & mmask[None, :, None] & (kv < W)[None, None, :]
                d = tl.load(d_p, mask=dm, other=0.0)
            if DB:
                if i == 0:
                    dbv += tl.sum(tl.sum(d.to(tl.float32), axis=2), axis=1)
            if DOT_F32:
                acc = tl.dot(xt.to(tl.float32), d.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, d, acc)
        tl.store(slot + (cl[:, None, None] * KC + ku[None, :, None]) * BW + kv[None, None, :], acc)
        tl.debug_barrier()  # D written by all threads
        us = kv[None, None, :] + jj[None, :, None] - PL  # [1, KWP, BW]
        em = (us >= 0) & (us < KC) & (jj < KW)[None, :, None]
        e = tl.load(slot + (cl[:, None, None] * KC + us) * BW + kv[None, None, :], mask=em, other=0.0)
        dwv += tl.sum(e, axis=2)
    else:
        for wt in range(0, tiles_w):
            w0 = wt * BW
            v = w0 + kv
            vmask = v < W
            q_lo = tl.maximum(w0 - PL, 0)
            q_hi = tl.minimum(w0 + (BW - 1 + KW - PL), W)
            for u0 in range(q_lo, q_hi, KC):
                u = u0 + ku
                umask = u < q_hi
                acc = tl.zeros((BC, KC, BW), dtype=tl.float32)
                for r0 in range(first, last, BR):
                    m = r0 + kr
                    mmask = m < last
                    n = m // H
                    h = m % H
                    if INT64:
                        n = n.to(tl.int64)
                        h = h.to(tl.int64)
                    hh = h + (i - PT)
                    rmask = mmask & (hh >= 0) & (hh < H)
                    xt = tl.load(x_c + (n * sxn + hh * sxh)[None, None, :] + (u * sxw)[None, :, None],
                                 mask=cmask[:, None, None] & umask[None, :, None] & rmask[None, None, :], other=0.0)
                    dm = cmask[:, None, None] & mmask[None, :, None] & vmask[None, None, :]
                    d = tl.load(d_c + (n * sdn + h * sdh)[None, :, None] + (v * sdw)[None, None, :], mask=dm, other=0.0)
                    if DB:  # (input_grad takes db from the da kernel instead: this in-loop reduction costs issue slots)
                        if (i == 0) & (u0 == q_lo):  # db: every pixel once (kernel row 0, first chunk of each W-tile)
                            dbv += tl.sum(tl.sum(d.to(tl.float32), axis=2), axis=1)
                    if DOT_F32:
                        acc = tl.dot(xt.to(tl.float32), d.to(tl.float32), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(xt, d, acc)
                # the banded sum: tap j collects D[u, v] with u0 + u - (w0 + v) + PL == j. D goes through the
                # program's scratch slot (fp32, L1/L2) and is read back skewed, E[b, j, v] = D[b, v + j - PL - (u0 - w0), v],
                # so one reduction over v serves every tap (KW masked reductions of D cost ~20x more issue slots)
                tl.debug_barrier()  # the previous chunk's skewed reads are done
                tl.store(slot + (cl[:, None, None] * KC + ku[None, :, None]) * BW + kv[None, None, :], acc)
                tl.debug_barrier()  # D written by all threads
                us = kv[None, None, :] + jj[None, :, None] - (PL + u0 - w0)  # [1, KWP, BW]
                em = (us >= 0) & (us < KC) & (jj < KW)[None, :, None]
                e = tl.load(slot + (cl[:, None, None] * KC + us) * BW + kv[None, None, :], mask=em, other=0.0)
                dwv += tl.sum(e, axis=2)
    base = dwp_ptr + split.to(tl.int64) * (KH * KW * C)
    tl.store(base + (i * KW + jj)[None, :] * C + c[:, None], dwv, mask=cmask[:, None] & (jj < KW)[None, :])
    if DB:
        if i == 0:
            tl.store(dbp_ptr + split * C + c, dbv, mask=cmask)


@triton.jit
def _da_kernel(dy_ptr, a_ptr, coef_ptr, da_ptr, dbp_ptr, C, H, W, tiles_w, tiles_per_img,
               sgn, sgc, sgh, sgw, son, soc, soh, sow, ACT: tl.constexpr, TRAIN: tl.constexpr,
               TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
               INTERP: tl.constexpr, EVEN: tl.constexpr = False):
    """da = act'(a) * (k1*(dy - mean_dy) + k2*(act(a) - mean)) (TRAIN; else k1*dy), coef [4, C] = (k1, k2,
    mean_dy, mean), stored in da's dtype with a's strides; the same arithmetic as ``_input_grad_kernel``. Also
    the tile's db partial (sum of the stored da per channel) into dbp [tiles, C]. EVEN: H, W, C multiples of the
    tile, so no masks and no select before the sum."""
    n, h, w, c, pmask, cmask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, tiles_w, tiles_per_img,
                                     TH, TW, BLOCK_C, INT64)
    mask = pmask[:, None] & cmask[None, :]
    o_off = _offsets(n, h, w, c, son, soc, soh, sow)
    if EVEN:
        k1 = tl.load(coef_ptr + c)[None, :]
        dy = tl.load(dy_ptr + _offsets(n, h, w, c, sgn, sgc, sgh, sgw)).to(tl.float32)
        a = tl.load(a_ptr + o_off).to(tl.float32)
    else:
        k1 = tl.load(coef_ptr + c, mask=cmask, other=0.0)[None, :]
        dy = tl.load(dy_ptr + _offsets(n, h, w, c, sgn, sgc, sgh, sgw), mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    if TRAIN:  # with the batch-statistics terms; the subtraction first, as PyTorch does
        k2 = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)[None, :]
        mean_dy = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0)[None, :]
        mean = tl.load(coef_ptr + 3 * C + c, mask=cmask, other=0.0)[None, :]
        dg = k1 * (dy - mean_dy) + k2 * (act_fwd(a, ACT) - mean)
    else:
        dg = k1 * dy
    da = _to(act_grad(a, ACT) * dg, da_ptr.dtype.element_ty, INTERP)
    # db partial of this tile: the stored (rounded) da summed, row = tile
    if EVEN:
        tl.store(da_ptr + o_off, da)
        tl.store(dbp_ptr + tl.program_id(0) * C + c, tl.sum(da.to(tl.float32), axis=0))
    else:
        tl.store(da_ptr + o_off, da, mask=mask)
        tl.store(dbp_ptr + tl.program_id(0) * C + c, tl.sum(tl.where(mask, da.to(tl.float32), 0.0), axis=0),
                 mask=cmask)


# ====================================================================== configurations


@dataclass(frozen=True)
class TCConfig:
    bc: int  # channels per program (the dot's batch)
    bm: int  # rows (n, h) per program (conv) / rows per reduction step (weight gradient)
    bw: int  # output columns per tile
    kc: int  # input-window columns per dot (the dot's K)
    num_warps: int = 4
    num_stages: int = 1


def conv_config(x: torch.Tensor, k: int) -> TCConfig:
    """Conv tiles (forward and dx). Interpreter: the smallest dot (16) and 2 channels. GPU: BW = KC = 32
    (a whole 32-wide row per dot: the window clipped to the map is the row itself), 32 rows, 8 channels
    (16 contiguous bytes per pixel in channels_last), 8 warps: 128 registers (EVEN, 1536/20 bf16), so 2 programs
    per SM, 4 warps per scheduler (64 rows: 176-233 registers, 1 program, half the latency hiding); chosen from
    the static sm_90 compile (bench/static_tc.py --configs, k = 31 forward: 8x64 x 8 warps, 4x64, 16x32, 16x16,
    8x16 x 4 warps and 8x32 x 4 warps predict slower)."""
    H, W = x.shape[-2:]
    if interpreting(x.device):
        return TCConfig(2, 16, 16, 16, 1)
    bw = 32 if W > 16 else 16
    return TCConfig(8, 32, bw, bw, 8)


def wgrad_config(x: torch.Tensor, k: int) -> TCConfig:
    """Weight-gradient tiles: 8 channels, 32-row steps, BW = KC = 32, 8 warps (~100-128 registers: 2 programs per
    SM; 4 warps: 168 registers, 3 programs, 3 warps per scheduler). Static sm_90, 1536/20 bf16 k = 9: 8x32 x 8
    warps 202 us (198 with the DENSE body's chunk loop compiled out), 8x16 x 4 273, 4x32 x 4 329, 16x32 x 8 449;
    8x64 x 8 spills at k = 31."""
    H, W = x.shape[-2:]
    if interpreting(x.device):
        return TCConfig(2, 16, 16, 16, 1)
    bw = 32 if W > 16 else 16
    return TCConfig(8, 32, bw, bw, 8)


def da_config(H: int, W: int, C: int, channels_last: bool, device) -> TileConfig:
    """``_da_kernel``'s tiles: twice the CUDA-core default's elements per thread (8x8 pixels x 64 channels in
    channels_last, 8x32 x 8 in NCHW, 4 warps), the db partial's cross-thread reduction and the tile arithmetic
    amortized over more elements (static sm_90, 1536/20 bf16: 212.5 -> 190.2 us channels_last, 204.7 -> 188.6
    NCHW; 8x16 x 32, 16x16 x 32 x 8 warps, 8x8 x 128 x 8 warps predict 191-194). Interpreter: the default."""
    if interpreting(device):
        return default_config(H, W, C, channels_last, device)
    if channels_last:
        return TileConfig(min(8, p2(H)), min(8, p2(W)), min(64, p2(C)), 4)
    return TileConfig(min(8, p2(H)), min(32, p2(W)), min(8, p2(C)), 4)


def _splits(rows: int, programs: int, device) -> int:
    """Row splits of the weight gradient: enough programs for two waves at ~4 programs per SM, at least
    256 rows per split (so the banded sum stays a small part of a program's work)."""
    if interpreting(device):
        return min(2, max(1, triton.cdiv(rows, 16)))
    want = triton.cdiv(2 * 4 * num_sms(device), programs)
    return max(1, min(want, rows // 256 or 1))


# ====================================================================== helpers


def _dense_table(weight: torch.Tensor, dtype, bc: int, kc: int, bw: int, pl: int, flip: bool) -> torch.Tensor:
    """[cblocks*bc, KH, kc, bw] in ``dtype``: T_i[u, v] = w[c, i, u - v + pl] (zero off the band and past C)."""
    C, _, KH, KW = weight.shape
    w = weight.reshape(C, KH, KW)
    if flip:
        w = w.flip(1, 2)
    j = torch.arange(kc, device=weight.device)[:, None] - torch.arange(bw, device=weight.device)[None, :] + pl
    band = (j >= 0) & (j < KW)
    cpad = triton.cdiv(C, bc) * bc
    tab = torch.zeros(cpad, KH, kc, bw, dtype=dtype, device=weight.device)
    tab[:C] = torch.where(band, w.to(dtype)[:, :, j.clamp(0, KW - 1)], torch.zeros((), dtype=dtype, device=w.device))
    return tab


def _table(weight: torch.Tensor, dtype, bc: int, L: int, off: int, flip: bool) -> torch.Tensor:
    """[cblocks*bc, KH, L] in ``dtype``: w[c, i, j] at off + j (flipped in both axes for the transposed conv),
    zeros elsewhere and for channels past C."""
    C, _, KH, KW = weight.shape
    w = weight.reshape(C, KH, KW)
    if flip:
        w = w.flip(1, 2)
    cpad = triton.cdiv(C, bc) * bc
    tab = torch.zeros(cpad, KH, L, dtype=dtype, device=weight.device)
    tab[:C, :, off:off + KW] = w.to(dtype)
    return tab


def conv_even(shape, cfg: TCConfig) -> bool:
    """``_tc_conv_kernel``'s EVEN: every tile full (C % BC, N*H % BM, W % BW all 0), no channel/row/column masks."""
    N, C, H, W = shape
    return C % cfg.bc == 0 and (N * H) % cfg.bm == 0 and W % cfg.bw == 0


def wgrad_even(shape, cfg: TCConfig, per: int) -> bool:
    """``_tc_wgrad_kernel``'s EVEN: one W-tile of one chunk (W <= BW, KC), full channel blocks, and every BR-row step
    inside one image (H and the split's rows ``per`` multiples of BR)."""
    N, C, H, W = shape
    return W <= cfg.bw and W <= cfg.kc and C % cfg.bc == 0 and H % cfg.bm == 0 and per % cfg.bm == 0


def _conv(x, weight, pads, cfg: TCConfig, *, flip=False, bias=None, res=None, stats=False, act=0,
          apply_to=None, store=True):
    """One ``_tc_conv_kernel`` launch: -> (out, y, partials or None)."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[-2:]
    pt, pl = pads
    if flip:  # conv^T = correlation with the flipped kernel, padding on the other side
        pt, pl = KH - 1 - pt, KW - 1 - pl
    off = cfg.bw - 1
    L = off + cfg.bw + KW + cfg.kc - 2
    dense = W <= cfg.bw and W <= cfg.kc
    even = conv_even(x.shape, cfg)
    if dense:
        tab = _dense_table(weight, x.dtype, cfg.bc, cfg.kc, cfg.bw, pl, flip)
    else:
        tab = _table(weight, x.dtype, cfg.bc, L, off, flip)
    M = N * H
    tiles_w = triton.cdiv(W, cfg.bw)
    T = triton.cdiv(M, cfg.bm) * tiles_w
    cblocks = triton.cdiv(C, cfg.bc)
    out = empty_output(x) if store else None
    y = empty_output(x) if apply_to is not None else None
    part = empty((3, T, C), dtype=torch.float32, device=x.device) if stats else None
    dummy = tab
    r = res if res is not None else (x if apply_to is not None else None)  # dy (dx), or x (eval's residual)
    scale = apply_to[SCALE] if apply_to is not None else None
    shift = apply_to[SHIFT] if apply_to is not None else None
    o = out if out is not None else y
    int64 = needs_int64(x, o) or (r is not None and needs_int64(r))
    _tc_conv_kernel[(cblocks, T)](
        x, tab, bias if bias is not None else dummy, r if r is not None else dummy, out if store else o,
        y if y is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, part if part is not None else dummy,
        C, H, W, M, tiles_w, T, *_strides(x), *_strides(o), *(_strides(r) if r is not None else (0, 0, 0, 0)),
        KH=KH, KW=KW, PT=pt, PL=pl, L=L, OFF=off, ACT=act, HAS_BIAS=bias is not None, RES=res is not None,
        STATS=stats, APPLY=apply_to is not None, STORE=store, DENSE=dense, EVEN=even, BC=cfg.bc, BM=cfg.bm, BW=cfg.bw,
        KC=cfg.kc,
        DOT_F32=interpreting(x.device), INT64=int64, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, y, part


# ====================================================================== the contract and its pieces


def tc_unsupported(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why the tensor-core path cannot (or should not) run this conv, or None."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {x.dtype}: the tensor-core path takes bf16/fp16 (fp32 would need tf32, less exact than PyTorch)"
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        return f"input {tuple(x.shape)} with weight {tuple(weight.shape)} is not a depthwise conv"
    kh, kw = weight.shape[-2:]
    if min(kh, kw) < MIN_K:
        return f"kernel {kh}x{kw}: below {MIN_K} the CUDA-core path is cheaper (the Toeplitz band is mostly zeros)"
    return None


def choose_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """"tc" or "cuda_core" for the depthwise conv of this block (``depthwise._path`` applies it, logged).

    Rule, from the static sm_90 predictions (not measurements) in bench/results/static-sm90-depthwise-tc.json,
    paper shape 64 x 1536 x 32 x 32, bf16, channels_last: the tensor-core conv work (forward, da, dx, dw) is
    0.83 ms at k = 9 (CUDA-core kernels 2.30 ms) and 1.85 ms at k = 31 (25.6 ms); its cost grows with KH only
    (a 32-wide Toeplitz band per kernel row), the CUDA-core one with KH * KW. So: "tc" whenever
    ``tc_unsupported`` is None (bf16/fp16, k >= MIN_K = 2), else "cuda_core". The same model across small k
    (depthwise block fwd+bwd, us, tensor cores vs CUDA cores): k=1 867 vs 727, k=2 887 vs 1100, k=3 899 vs
    1233, k=5 942 vs 1461, k=6 973 vs 1846: the band's zeros cost less than the CUDA-core path's per-tap
    instructions from k = 2 on."""
    return "tc" if tc_unsupported(x, weight) is None else "cuda_core"


def conv_stats(x, weight, bias, act: int, pads: Tuple[int, int]):
    """a = dwconv(x) + b in x's dtype and layout, and the [3, T, C] partials of act(a) (one row per tile)."""
    cfg = conv_config(x, max(weight.shape[-2:]))
    a, _, part = _conv(x, weight, pads, cfg, bias=bias, stats=True, act=act)
    return a, part


def conv_apply(x, weight, bias, finalized, act: int, pads: Tuple[int, int], store_a: bool):
    """Eval: y = act(dwconv(x) + b) * scale + shift + x in one kernel; a kept only if ``store_a``."""
    cfg = conv_config(x, max(weight.shape[-2:]))
    a, y, _ = _conv(x, weight, pads, cfg, bias=bias, act=act, apply_to=finalized, store=store_a)
    return y, (a if store_a else x.new_empty(0))


def conv_transpose_add(da, dy, weight, pads: Tuple[int, int]):
    """dx = dy + dwconv^T(da): the forward kernel on the flipped kernel with transposed padding, dy added in fp32."""
    cfg = conv_config(da, max(weight.shape[-2:]))
    dx, _, _ = _conv(da, weight, pads, cfg, flip=True, res=dy)
    return dx


def weight_grad(da, x, KH: int, KW: int, pads: Tuple[int, int], db: bool = True):
    """(dw [KH*KW, C], db [C] or None) float32 from da and x on tensor cores: per-split partials, summed in a
    fixed order (the layout ``depthwise._weight_grad`` returns). ``db=False``: no db (``input_grad`` has it from
    the da kernel)."""
    N, C, H, W = x.shape
    cfg = wgrad_config(x, max(KH, KW))
    M = N * H
    cblocks = triton.cdiv(C, cfg.bc)
    splits = _splits(M, cblocks * KH, x.device)
    per = triton.cdiv(triton.cdiv(M, splits), cfg.bm) * cfg.bm
    splits = triton.cdiv(M, per)
    f32 = dict(dtype=torch.float32, device=x.device)
    dwp = empty((splits, KH * KW, C), **f32)
    dbp = empty((splits, C), **f32) if db else dwp
    scratch = empty((splits * KH * cblocks, cfg.bc * cfg.kc * cfg.bw), **f32)
    dense = W <= cfg.bw and W <= cfg.kc
    even = wgrad_even(x.shape, cfg, per)
    _tc_wgrad_kernel[(cblocks, KH, splits)](
        da, x, dwp, dbp, scratch, C, H, W, M, per, triton.cdiv(W, cfg.bw), *_strides(da), *_strides(x),
        KH=KH, KW=KW, KWP=p2(KW), PT=pads[0], PL=pads[1], BC=cfg.bc, BR=cfg.bm, BW=cfg.bw, KC=cfg.kc, DB=db,
        DENSE=dense, EVEN=even,
        DOT_F32=interpreting(x.device), INT64=needs_int64(x, da), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return sum_rows(dwp), (sum_rows(dbp) if db else None)


def pre_activation_grad(dy, a, coef, act: int, train: bool):
    """(da, db): da (x's dtype, a's layout) = act'(a) * BN_bwd(dy), coef = [4, C] (k1, k2, mean_dy, mean), and
    db [C] float32 = the sum of the stored da (per-tile partials summed in a fixed order)."""
    N, C, H, W = a.shape
    da = empty_output(a)
    cfg = da_config(H, W, C, a.is_contiguous(memory_format=torch.channels_last), a.device)
    tiles_w = triton.cdiv(W, cfg.tw)
    tiles_per_img = triton.cdiv(H, cfg.th) * tiles_w
    dbp = empty((N * tiles_per_img, C), dtype=torch.float32, device=a.device)
    _da_kernel[(N * tiles_per_img, triton.cdiv(C, cfg.block_c))](
        dy, a, coef, da, dbp, C, H, W, tiles_w, tiles_per_img, *_strides(dy), *_strides(a), ACT=act, TRAIN=train,
        TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=needs_int64(dy, a, da), INTERP=interpreting(a.device),
        EVEN=H % cfg.th == 0 and W % cfg.tw == 0 and C % cfg.block_c == 0, num_warps=cfg.num_warps)
    return da, sum_rows(dbp)


def input_grad(dy, a, x, weight, coef, act: int, pads: Tuple[int, int], train: bool, need_dx: bool,
               need_dw: bool, need_db: bool):
    """(dx, dw, db) as ``depthwise.input_grad``: da materialized once (``pre_activation_grad``), then
    dx = dy + conv^T(da) and dw, db on tensor cores. A gradient not asked for is an empty tensor."""
    KH, KW = weight.shape[-2:]
    da, dbk = pre_activation_grad(dy, a, coef, act, train)
    dx = conv_transpose_add(da, dy, weight, pads) if need_dx else x.new_empty(0)
    dw = db = x.new_empty(0)
    if need_dw:
        dwk, _ = weight_grad(da, x, KH, KW, pads, db=False)
        dw = dwk.t().contiguous().view(weight.shape).to(weight.dtype)
    if need_db:
        db = dbk.to(weight.dtype)
    return dx, dw, db


def unsupported(**config) -> Optional[str]:
    """Limits beyond the contract's own checks: see ``tc_unsupported`` (needs x and weight)."""
    x, weight = config.get("x"), config.get("weight")
    if x is None or weight is None:
        return None
    return tc_unsupported(x, weight)
