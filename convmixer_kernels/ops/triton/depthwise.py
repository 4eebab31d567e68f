"""Triton backend of the depthwise block (``ops/depthwise_block.py`` holds the op's contract).

Two paths for the conv work, chosen per call in one place, ``_path(x, weight, prologue)``:

* "cuda_cores": this file's kernels (below), any dtype, any k, with or without an input-side prologue;
* "tensor_cores": ``depthwise_tc.py`` (Toeplitz GEMMs on tensor cores), bf16/fp16 with k >= 2, no prologue.

``conv_stats``, ``conv_apply`` and ``input_grad`` ask ``_path`` and delegate to ``depthwise_tc`` on the
tensor-core path; ``finalize``, ``apply`` and ``grad_sums`` are shared (the tensor-core partials have one
row per tile instead of one per program, which ``finalize`` takes as they come). The rule ("auto") is
``depthwise_tc.choose_path``, from static sm_90 predictions (bench/results/static-sm90-depthwise-tc.json:
tensor cores ahead at k = 9 and far ahead at k = 31; not measurements): tensor cores whenever
``depthwise_tc.tc_unsupported`` is None, except with a prologue (the tensor-core kernels have none). The
environment variable ``CONVMIXER_KERNELS_DW_PATH`` = ``auto`` (default) / ``cuda_cores`` / ``tensor_cores``
forces a path; forcing tensor cores on a call they cannot run raises ``BackendUnavailableError`` with the
reason. Each choice is logged at INFO, with its reason, once per (shape, dtype, layout, kernel size,
prologue or not, request). Both paths are bitwise reproducible run to run (fixed-order sums, no atomics).

The CUDA-core path: kernels (top) and the contract's launchers (bottom). One unit = one read or write of an
N*C*H*W tensor:

* training forward (5): ``conv_stats`` (``_conv_kernel``) reads x, stores the pre-activation a
  and per-program statistics of act(a); ``finalize`` combines them in a fixed order; ``apply``
  (``_apply_kernel``) reads a and x, writes y.
* eval forward (2, or 3 when a is kept for a backward): ``conv_apply``, one ``_conv_kernel``
  launch reads x and writes y.
* backward (8): ``grad_sums`` (``_reduce_kernel``) reads dy and a for sum(dy) and sum(dy * xhat);
  ``input_grad``: ``_input_grad_kernel`` recomputes da = act'(a) * BN_bwd(dy) over each tile and
  its halo once (into a small per-program scratch slot that stays in L1/L2), reads it back shifted
  for dx = dy + dwconv^T(da), and stores each tile's own da once (x's dtype); then
  ``_weight_grad_kernel`` reads da and x for per-chunk partials of dw and db (register
  accumulators, one fixed-order reduction per program), summed by ``common.sum_rows`` in a fixed
  order. The stored da costs 2 units over the design's 6 and takes the per-tap reductions and
  partial read-modify-writes out of the dx kernel.

Input-side prologue (design.md 3.3, ``ops/prologue.py``): ``conv_stats`` and ``input_grad`` take
``prologue=Affine``; the kernels that read x (``_conv_kernel``, ``_weight_grad_kernel``) then build
z = act(x) * s + t while they stage x (``_stage``: once per staged element, rounded to x's dtype, the
zero padding applied to z), so the counts above do not change: x is read where a stored z would
have been, and no pass is added. It is the constexpr PRO_ACT of those kernels (-1: off, the code
compiled without a prologue is unchanged). It costs instructions instead: act and the affine run
per staged element, and elements are staged more than once (the conv's halo, 4x the tile at k = 9
on 8x8 tiles; the weight gradient stages each x band once per tap row).

The conv kernels (forward, dx) stage each tile's input window (tile + halo, zero padded,
channel-fastest) into the program's scratch slot once; the taps then read it at compile-time
offsets with no masks, column taps unrolled, rows reaching the map only, weights float32
([channel blocks, KH*KW, BLOCK_C]); bf16 windows are read as int32 channel pairs and widened
with one integer op per value. Persistent grids hold one wave: the resident programs per SM come
from the compiled kernel's registers and shared memory (``_resident``).

Tile shapes: fixed under the interpreter; on CUDA the conv and backward kernels try a few shapes
on first use of a (shape, dtype, layout, kernel) through ``common.Autotuner``, except in
deterministic mode (``tuning.autotune_enabled``). Every kernel takes the strides of each tensor
it touches, so NCHW, channels_last and strided views run without copies; offsets switch to int64
when a tensor spans 2**31 elements or more (``common.needs_int64``). Every sum is in a fixed
order (no atomics): bitwise-reproducible runs for a given GPU and configuration.
"""
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...backends import BackendUnavailableError, log_event
from ..alloc import empty, empty_like, empty_output
from ..batchnorm import SCALE, SHIFT, MEAN, RSTD
from ..prologue import Affine
from .activation import act_fwd, act_grad
from .batchnorm import _chan, finalize  # noqa: F401  (finalize is part of this backend's contract)
from .common import Autotuner, interpreting, needs_int64, num_sms, p2, static_active, sum_rows

# ====================================================================== Triton kernels
# A tile is TH x TW output pixels of one image (flattened to TH*TW rows of a 2D block) times
# BLOCK_C channels; tiles are numbered image by image (tile t of image n is n*tiles_per_img + t).


@triton.jit
def _tile(item, cblock, C, H, W, tiles_w, tiles_per_img,
          TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Image n, pixel rows h and columns w (one per block row), channels c and masks of one tile."""
    n = item // tiles_per_img
    t = item % tiles_per_img
    p = tl.arange(0, TH * TW)
    h = (t // tiles_w) * TH + p // TW
    w = (t % tiles_w) * TW + p % TW
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = (h < H) & (w < W)
    cmask = c < C
    if INT64:  # every offset computed from these is then 64-bit
        n = n.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
        c = c.to(tl.int64)
    return n, h, w, c, pmask, cmask


@triton.jit
def _offsets(n, h, w, c, sn, sc, sh, sw):
    """Element offsets of the [pixels, channels] block at rows h, columns w, channels c of image n."""
    return n * sn + (h * sh + w * sw)[:, None] + (c * sc)[None, :]


@triton.jit
def _stage(src_ptr, slot, n, r0, q0, c, cmask, H, W, sn, sc, sh, sw, pro_s_ptr, pro_t_ptr,
           ROWS: tl.constexpr, COLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
           PRO_ACT: tl.constexpr):
    """slot[(r*COLS + q)*BLOCK_C + cl] = src[n, c, r0 + r, q0 + q] for r < ROWS, q < COLS, in the slot's
    dtype, zero outside the map and past C: the window a tile's taps read, channel-fastest whatever the
    layout (vector loads of every tap), its zero padding written once so the taps need no masks.

    PRO_ACT >= 0 (an input-side prologue, ``prologue.Affine``): the window holds
    z = act(src) * s[c] + t[c] instead (fp32 math rounded to src's dtype, as a stored z would be),
    computed once per staged element; the zero padding applies to z (masked after the affine, so a
    tap outside the map reads 0, not act(0) * s + t). pro_s_ptr, pro_t_ptr: the float32 s and t
    (``finalized[SCALE]``, ``finalized[SHIFT]``), unused when PRO_ACT < 0."""
    cl = tl.arange(0, BLOCK_C)
    if PRO_ACT >= 0:  # per call (L1 hits), not per program: nothing held in registers across the caller's loop
        pro_s = tl.load(pro_s_ptr + c, mask=cmask, other=0.0)
        pro_t = tl.load(pro_t_ptr + c, mask=cmask, other=0.0)
    for s0 in range(0, ROWS * COLS, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        hh = r0 + s // COLS
        ww = q0 + s % COLS
        m = (s < ROWS * COLS) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        mm = m[:, None] & cmask[None, :]
        v = tl.load(src_ptr + n * sn + (hh * sh + ww * sw)[:, None] + (c * sc)[None, :], mask=mm, other=0.0)
        if PRO_ACT >= 0:
            z = act_fwd(v.to(tl.float32), PRO_ACT) * pro_s[None, :] + pro_t[None, :]
            v = tl.where(mm, z.to(src_ptr.dtype.element_ty), 0.0)
        tl.store(slot + s[:, None] * BLOCK_C + cl[None, :], v.to(slot.dtype.element_ty),
                 mask=(s < ROWS * COLS)[:, None])


@triton.jit
def _tile_origin(item, tiles_w, tiles_per_img, TH: tl.constexpr, TW: tl.constexpr, INT64: tl.constexpr):
    t = item % tiles_per_img
    h0 = (t // tiles_w) * TH
    w0 = (t % tiles_w) * TW
    if INT64:
        h0 = h0.to(tl.int64)
        w0 = w0.to(tl.int64)
    return h0, w0


@triton.jit
def _tap(acc_e, acc_o, s_ptr, w_ptr, PAIRS: tl.constexpr, HALF: tl.constexpr):
    """acc += staged input * tap weight. PAIRS (bf16 scratch): the slot read as int32 channel pairs, each
    half widened to float32 by one shift or mask (acc_e: even channels, acc_o: odd ones)."""
    if PAIRS:
        v = tl.load(s_ptr)
        acc_e += (v << 16).to(tl.float32, bitcast=True) * tl.load(w_ptr)[None, :]
        acc_o += (v & -65536).to(tl.float32, bitcast=True) * tl.load(w_ptr + HALF)[None, :]
    else:
        acc_e += tl.load(s_ptr).to(tl.float32) * tl.load(w_ptr)[None, :]
    return acc_e, acc_o


@triton.jit
def _conv_kernel(x_ptr, wt_ptr, b_ptr, a_ptr, y_ptr, scale_ptr, shift_ptr, part_ptr, scratch_ptr,
                 pro_scale_ptr, pro_shift_ptr,
                 C, H, W, T, tiles_w, tiles_per_img,
                 sxn, sxc, sxh, sxw, son, soc, soh, sow,
                 KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAIN: tl.constexpr, STORE_A: tl.constexpr,
                 TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
                 PAIRS: tl.constexpr, PRO_ACT: tl.constexpr):
    """a = dwconv(x) + b over tiles. TRAIN: store a, and the program's (count, mean, M2) of act(a) (over
    all its tiles: per-element Welford in registers, one fixed-order Chan tree at the end) into row p
    of partials [3, P, C]. Eval: y = act(a) * scale + shift + x, storing a only if asked.

    PRO_ACT >= 0 (input-side prologue, design.md 3.3): x is read as z = act_PRO(x) * pro_scale[c] +
    pro_shift[c] (rounded to x's dtype) wherever it is read: in the staged window (zero padded as z,
    see ``_stage``) and, in eval, the residual. PRO_ACT = -1: no prologue (pro_* unused).

    Persistent: program (p, cb) walks tiles p, p + P, ... of channel block cb. Each tile's input window
    (tile + halo) is staged once into the program's scratch slot (x's dtype, zero padded, channel-fastest),
    then the taps read it back at compile-time offsets: column taps unrolled (``tl.static_range``),
    tap rows a runtime loop over the rows that reach the map only, weights fp32 from ``wt``
    ([channel blocks, KH*KW, BLOCK_C], zero-padded channels; PAIRS: even channels then odd ones), no
    masks in the tap loop. PAIRS (bf16): channel pairs widened by integer ops (see ``_tap``).
    """
    HALF: tl.constexpr = BLOCK_C // 2
    VEC: tl.constexpr = HALF if PAIRS else BLOCK_C  # scratch elements (int32 pairs or values) per pixel
    RH: tl.constexpr = TH + KH - 1
    RW: tl.constexpr = TW + KW - 1
    TILE: tl.constexpr = TH * TW
    SKIP_COLS: tl.constexpr = (PL >= TW) or (KW - 1 - PL >= TW)  # some column taps can miss a full tile wholly
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cb = tl.program_id(1)
    cl = tl.arange(0, BLOCK_C)
    slot = scratch_ptr + (cb * n_prog + pid).to(tl.int64) * (RH * RW * BLOCK_C)
    p = tl.arange(0, TILE)
    vl = tl.arange(0, VEC)
    if PAIRS:
        s_base = slot.to(tl.pointer_type(tl.int32), bitcast=True)
    else:
        s_base = slot
    s_pix = s_base + ((p // TW) * RW + p % TW)[:, None] * VEC + vl[None, :]  # tap (0, 0) of pixel p
    w_blk = wt_ptr + cb * (KH * KW * BLOCK_C) + vl
    if TRAIN:  # per-element Welford over this program's tiles
        cnt = tl.zeros((TILE,), dtype=tl.float32)
        mean_e = tl.zeros((TILE, BLOCK_C), dtype=tl.float32)
        m2_e = tl.zeros((TILE, BLOCK_C), dtype=tl.float32)
    for item in range(pid, T, n_prog):
        n, h, w, c, pmask, cmask = _tile(item, cb, C, H, W, tiles_w, tiles_per_img, TH, TW, BLOCK_C, INT64)
        h0, w0 = _tile_origin(item, tiles_w, tiles_per_img, TH, TW, INT64)
        tl.debug_barrier()  # the previous tile's taps have read the slot
        _stage(x_ptr, slot, n, h0 - PT, w0 - PL, c, cmask, H, W, sxn, sxc, sxh, sxw, pro_scale_ptr, pro_shift_ptr,
               RH, RW, TILE, BLOCK_C, PRO_ACT)
        tl.debug_barrier()  # the window was written by all threads and is read back shifted
        acc_e = tl.zeros((TILE, VEC), dtype=tl.float32)
        acc_o = tl.zeros((TILE, VEC), dtype=tl.float32)
        # tap rows whose input rows meet the map for some pixel of the tile; the others read only zeros
        i_lo = tl.maximum(PT - h0 - (TH - 1), 0)
        i_hi = tl.minimum(H + PT - h0, KH)
        for i in range(i_lo, i_hi):
            s_row = s_pix + i * (RW * VEC)
            w_row = w_blk + i * (KW * BLOCK_C)
            for j in tl.static_range(KW):
                if SKIP_COLS:
                    if (w0 + (j - PL) < W) & (w0 + (TW - 1 + j - PL) >= 0):
                        acc_e, acc_o = _tap(acc_e, acc_o, s_row + j * VEC, w_row + j * BLOCK_C, PAIRS, HALF)
                else:
                    acc_e, acc_o = _tap(acc_e, acc_o, s_row + j * VEC, w_row + j * BLOCK_C, PAIRS, HALF)
        if PAIRS:
            acc = tl.reshape(tl.join(acc_e, acc_o), (TILE, BLOCK_C))
        else:
            acc = acc_e
        mask = pmask[:, None] & cmask[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        # a is rounded to the activation dtype before use: statistics, y and the backward all see
        # the stored value, so they agree with each other
        a = acc.to(y_ptr.dtype.element_ty)
        o_off = _offsets(n, h, w, c, son, soc, soh, sow)
        if STORE_A:
            tl.store(a_ptr + o_off, a, mask=mask)
        g = act_fwd(a.to(tl.float32), ACT)
        if TRAIN:  # pixels outside the map add nothing (weight 0)
            pm = pmask.to(tl.float32)
            cnt += pm
            r = pm / tl.maximum(cnt, 1.0)
            d = g - mean_e
            mean_e += d * r[:, None]
            m2_e += d * (g - mean_e) * pm[:, None]
        else:
            s = tl.load(scale_ptr + c, mask=cmask, other=0.0)
            t = tl.load(shift_ptr + c, mask=cmask, other=0.0)
            xc = tl.load(x_ptr + _offsets(n, h, w, c, sxn, sxc, sxh, sxw), mask=mask, other=0.0)
            if PRO_ACT >= 0:  # the residual is z too
                ps = tl.load(pro_scale_ptr + c, mask=cmask, other=0.0)
                pt = tl.load(pro_shift_ptr + c, mask=cmask, other=0.0)
                xc = (act_fwd(xc.to(tl.float32), PRO_ACT) * ps[None, :] + pt[None, :]).to(x_ptr.dtype.element_ty)
            y = g * s[None, :] + t[None, :] + xc.to(tl.float32)
            tl.store(y_ptr + o_off, y.to(y_ptr.dtype.element_ty), mask=mask)
    if TRAIN:
        cnt2 = tl.broadcast_to(cnt[:, None], (TILE, BLOCK_C))
        count, mean, m2 = tl.reduce((cnt2, mean_e, m2_e), 0, _chan)
        c = cb * BLOCK_C + cl
        cmask = c < C
        tl.store(part_ptr + pid * C + c, count, mask=cmask)
        tl.store(part_ptr + (n_prog + pid) * C + c, mean, mask=cmask)
        tl.store(part_ptr + (2 * n_prog + pid) * C + c, m2, mask=cmask)


@triton.jit
def _apply_kernel(x_ptr, a_ptr, y_ptr, scale_ptr, shift_ptr, C, H, W, tiles_w, tiles_per_img,
                  sxn, sxc, sxh, sxw, son, soc, soh, sow, ACT: tl.constexpr,
                  TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """y = act(a) * scale + shift + x (a and y share strides)."""
    n, h, w, c, pmask, cmask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, tiles_w, tiles_per_img,
                                     TH, TW, BLOCK_C, INT64)
    mask = pmask[:, None] & cmask[None, :]
    o_off = _offsets(n, h, w, c, son, soc, soh, sow)
    a = tl.load(a_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + _offsets(n, h, w, c, sxn, sxc, sxh, sxw), mask=mask, other=0.0)
    s = tl.load(scale_ptr + c, mask=cmask, other=0.0)
    t = tl.load(shift_ptr + c, mask=cmask, other=0.0)
    y = act_fwd(a, ACT) * s[None, :] + t[None, :] + xv.to(tl.float32)
    tl.store(y_ptr + o_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(dy_ptr, a_ptr, mean_ptr, rstd_ptr, part_ptr, C, H, W, n_items, items_per_chunk,
                   tiles_w, tiles_per_img, sgn, sgc, sgh, sgw, son, soc, soh, sow, ACT: tl.constexpr,
                   TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
                   EVEN: tl.constexpr = False):
    """Per-chunk sum(dy) and sum(dy * xhat), xhat = (act(a) - mean) * rstd, into partials [chunks, 2, C]:
    program (chunk, cb) adds its tiles elementwise in registers, in order, and reduces once at the end.
    sum dy * xhat is rstd * sum dy * (act(a) - mean) (one multiply per channel, not per element); masked
    lanes load dy = 0 and need no select (EVEN: H, W, C multiples of the tile, no masks). The in-tile
    offsets are loop-invariant (each tile adds a scalar base) and the chunk's consecutive tiles step
    (image, tile row, tile column) counters instead of dividing per tile."""
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    cl = tl.arange(0, BLOCK_C)
    cc = cb * BLOCK_C + cl
    cmask = cc < C
    mean = tl.load(mean_ptr + cc, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cc, mask=cmask, other=0.0)
    p = tl.arange(0, TH * TW)
    ph = p // TW
    pw = p % TW
    c = cc
    if INT64:
        ph = ph.to(tl.int64)
        pw = pw.to(tl.int64)
        c = c.to(tl.int64)
    off_g = (ph * sgh + pw * sgw)[:, None] + (c * sgc)[None, :]
    off_o = (ph * soh + pw * sow)[:, None] + (c * soc)[None, :]
    s_dy = tl.zeros((TH * TW, BLOCK_C), dtype=tl.float32)
    s_dyg = tl.zeros((TH * TW, BLOCK_C), dtype=tl.float32)
    first = chunk * items_per_chunk
    last = tl.minimum(first + items_per_chunk, n_items)
    # the chunk's tiles are consecutive: (image, tile row, tile column) stepped, not divided per tile
    tiles_h = tiles_per_img // tiles_w
    n_i = first // tiles_per_img
    t = first % tiles_per_img
    th_i = t // tiles_w
    tw_i = t % tiles_w
    for item in range(first, last):
        n = n_i
        h0 = th_i * TH
        w0 = tw_i * TW
        if INT64:
            n = n.to(tl.int64)
            h0 = h0.to(tl.int64)
            w0 = w0.to(tl.int64)
        if EVEN:  # whole tiles and channel blocks: no masks
            dy = tl.load(dy_ptr + (n * sgn + h0 * sgh + w0 * sgw) + off_g).to(tl.float32)
            a = tl.load(a_ptr + (n * son + h0 * soh + w0 * sow) + off_o).to(tl.float32)
        else:
            mask = ((h0 + ph < H) & (w0 + pw < W))[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + (n * sgn + h0 * sgh + w0 * sgw) + off_g, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + (n * son + h0 * soh + w0 * sow) + off_o, mask=mask, other=0.0).to(tl.float32)
        s_dy += dy  # masked lanes loaded as 0
        s_dyg += dy * (act_fwd(a, ACT) - mean[None, :])
        tw_i += 1
        wrap = tw_i == tiles_w
        tw_i = tl.where(wrap, 0, tw_i)
        th_i = tl.where(wrap, th_i + 1, th_i)
        wrap = th_i == tiles_h
        th_i = tl.where(wrap, 0, th_i)
        n_i = tl.where(wrap, n_i + 1, n_i)
    tl.store(part_ptr + chunk * 2 * C + cc, tl.sum(s_dy, axis=0), mask=cmask)
    tl.store(part_ptr + (chunk * 2 + 1) * C + cc, tl.sum(s_dyg, axis=0) * rstd, mask=cmask)


@triton.jit
def _input_grad_kernel(dy_ptr, a_ptr, wt_ptr, coef_ptr, dx_ptr, da_ptr, scratch_ptr,
                       C, H, W, n_items, tiles_w, tiles_per_img,
                       sgn, sgc, sgh, sgw, son, soc, soh, sow,
                       KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                       ACT: tl.constexpr, TRAIN: tl.constexpr, NEED_DX: tl.constexpr, STORE_DA: tl.constexpr,
                       TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """dx = dy + dwconv^T(da), da recomputed from (dy, a); STORE_DA: the tile's own da written once
    (da_ptr, x's dtype, a's strides) for ``_weight_grad_kernel``.

    da = act'(a) * (k1*(dy - mean_dy) + k2*(act(a) - mean)) with per-channel coef [4, C] = (k1, k2, mean_dy, mean).
    Persistent: program (p, cb) walks tiles p, p + P, ... of channel block cb. A tile's da over the tile
    plus its halo (zero outside the map: the transposed conv has no padding of its own) is computed once
    into the program's scratch slot (float32), then read back shifted at compile-time offsets: column
    taps unrolled, tap rows a runtime loop over the rows that reach the map, fp32 weights, no masks.
    """
    RW: tl.constexpr = TW + KW - 1
    REGION: tl.constexpr = (TH + KH - 1) * RW
    TILE: tl.constexpr = TH * TW
    SKIP_COLS: tl.constexpr = (PL >= TW) or (KW - 1 - PL >= TW)
    pid_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cb = tl.program_id(1)
    cl = tl.arange(0, BLOCK_C)
    cc = cb * BLOCK_C + cl
    k1 = tl.load(coef_ptr + cc, mask=cc < C, other=0.0)
    k2 = tl.load(coef_ptr + C + cc, mask=cc < C, other=0.0)
    mean_dy = tl.load(coef_ptr + 2 * C + cc, mask=cc < C, other=0.0)
    mean = tl.load(coef_ptr + 3 * C + cc, mask=cc < C, other=0.0)
    scratch = scratch_ptr + (cb * n_prog + pid_p).to(tl.int64) * (REGION * BLOCK_C)
    p = tl.arange(0, TILE)
    # scratch position of output pixel p's tap (KH-1, KW-1); tap (i, j) is (i*RW + j) rows before it
    s_out = scratch + ((p // TW + KH - 1) * RW + p % TW + KW - 1)[:, None] * BLOCK_C + cl[None, :]
    w_blk = wt_ptr + cb * (KH * KW * BLOCK_C) + cl
    for item in range(pid_p, n_items, n_prog):
        n, h, w, c, pmask, cmask = _tile(item, cb, C, H, W, tiles_w, tiles_per_img, TH, TW, BLOCK_C, INT64)
        h0, w0 = _tile_origin(item, tiles_w, tiles_per_img, TH, TW, INT64)
        tl.debug_barrier()  # the previous tile's taps have read the slot
        # 1. da over rows [h0 + PT - (KH-1), h0 + TH + PT) and columns [w0 + PL - (KW-1), w0 + TW + PL)
        for r0 in range(0, REGION, TILE):
            r = r0 + p
            qh = h0 + (PT - (KH - 1)) + r // RW
            qw = w0 + (PL - (KW - 1)) + r % RW
            m = ((r < REGION) & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W))[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + _offsets(n, qh, qw, c, sgn, sgc, sgh, sgw), mask=m, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + _offsets(n, qh, qw, c, son, soc, soh, sow), mask=m, other=0.0).to(tl.float32)
            if TRAIN:  # with the batch-statistics terms; the subtraction first, as PyTorch does
                dg = k1[None, :] * (dy - mean_dy[None, :]) + k2[None, :] * (act_fwd(a, ACT) - mean[None, :])
            else:
                dg = k1[None, :] * dy
            da = tl.where(m, act_grad(a, ACT) * dg, 0.0)
            if NEED_DX:
                tl.store(scratch + r[:, None] * BLOCK_C + cl[None, :], da, mask=(r < REGION)[:, None])
            if STORE_DA:  # the tile's own pixels, each written by exactly one tile
                own = m & ((qh >= h0) & (qh < h0 + TH) & (qw >= w0) & (qw < w0 + TW))[:, None]
                tl.store(da_ptr + _offsets(n, qh, qw, c, son, soc, soh, sow), da.to(da_ptr.dtype.element_ty),
                         mask=own)
        if NEED_DX:
            tl.debug_barrier()  # the region was written by all threads and is read back shifted
            acc = tl.zeros((TILE, BLOCK_C), dtype=tl.float32)
            # dx[h, w] += w[i, j] * da[h + PT - i, w + PL - j]: the flipped kernel; rows i whose da rows
            # h + PT - i meet the map for some pixel of the tile
            i_lo = tl.maximum(h0 + PT - (H - 1), 0)
            i_hi = tl.minimum(h0 + (TH - 1) + PT + 1, KH)
            for i in range(i_lo, i_hi):
                s_row = s_out - i * (RW * BLOCK_C)
                w_row = w_blk + i * (KW * BLOCK_C)
                for j in tl.static_range(KW):
                    if SKIP_COLS:
                        if (w0 + (PL - j) < W) & (w0 + (TW - 1 + PL - j) >= 0):
                            acc += tl.load(s_row - j * BLOCK_C) * tl.load(w_row + j * BLOCK_C)[None, :]
                    else:
                        acc += tl.load(s_row - j * BLOCK_C) * tl.load(w_row + j * BLOCK_C)[None, :]
            mask = pmask[:, None] & cmask[None, :]
            dyc = tl.load(dy_ptr + _offsets(n, h, w, c, sgn, sgc, sgh, sgw), mask=mask, other=0.0)
            tl.store(dx_ptr + _offsets(n, h, w, c, son, soc, soh, sow),
                     (acc + dyc.to(tl.float32)).to(dx_ptr.dtype.element_ty), mask=mask)  # + the residual's


@triton.jit
def _wg_tap(acc_e, acc_o, d_e, d_o, s_ptr, U: tl.constexpr, G: tl.constexpr, j0, KW: tl.constexpr,
            VEC: tl.constexpr, PAIRS: tl.constexpr):
    """acc += da * (staged x at column tap j0 + U), when this group has a tap U (compile time) that exists.
    PAIRS: the bf16 band read as int32 channel pairs (acc_e / d_e: even channels, acc_o / d_o: odd)."""
    if U < G:
        if j0 + U < KW:
            if PAIRS:
                v = tl.load(s_ptr + U * VEC)
                acc_e += d_e * (v << 16).to(tl.float32, bitcast=True)
                acc_o += d_o * (v & -65536).to(tl.float32, bitcast=True)
            else:
                acc_e += d_e * tl.load(s_ptr + U * VEC).to(tl.float32)
    return acc_e, acc_o


@triton.jit
def _wg_store(acc_e, acc_o, dwp_ptr, row, U: tl.constexpr, G: tl.constexpr, j0, KW: tl.constexpr, C, ce,
              PAIRS: tl.constexpr):
    """Partial dw of tap (row + U) for channels ce (PAIRS: ce even, ce + 1 from acc_o)."""
    if U < G:
        if j0 + U < KW:
            ptr = dwp_ptr + (row + U) * C + ce
            tl.store(ptr, tl.sum(acc_e, axis=0), mask=ce < C)
            if PAIRS:
                tl.store(ptr + 1, tl.sum(acc_o, axis=0), mask=ce + 1 < C)


@triton.jit
def _weight_grad_kernel(da_ptr, x_ptr, dwp_ptr, dbp_ptr, scratch_ptr, pro_scale_ptr, pro_shift_ptr,
                        C, H, W, n_items, tiles_w, tiles_per_img, items_per_chunk, n_jg,
                        sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
                        KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr, G: tl.constexpr,
                        TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
                        PAIRS: tl.constexpr, PRO_ACT: tl.constexpr):
    """Per-chunk partials dw[chunk, i*KW + j, c] = sum over the chunk's pixels of da * x shifted by tap
    (i, j), and db[chunk, c] = sum of da (program of tap group 0 only).

    Program (cb, tap row i x column group jg, chunk): G column taps j0 .. j0 + G - 1 (j0 = jg*G) of
    tap row i over the chunk's tiles, in order. Per tile: the stored da tile (once, no halo) and the
    x band rows h0 + i - PT .. (+TH), columns w0 + j0 - PL .. (+TW + G - 1) staged (zero padded, x's
    dtype) into the program's scratch slot; G register accumulators (one per tap, elementwise FMAs;
    PAIRS: bf16 channel pairs widened by integer ops, even and odd channels apart); one fixed-order
    reduction over pixels per tap at the end. Deterministic; no atomics.

    PRO_ACT >= 0 (input-side prologue): the band staged is z = act_PRO(x) * pro_scale[c] + pro_shift[c]
    (x's dtype, zero padded as z, see ``_stage``), so dw = sum da * z shifted. PRO_ACT = -1: x itself.
    """
    BW: tl.constexpr = TW + G - 1
    TILE: tl.constexpr = TH * TW
    HALF: tl.constexpr = BLOCK_C // 2
    VEC: tl.constexpr = HALF if PAIRS else BLOCK_C
    cb = tl.program_id(0)
    tap = tl.program_id(1)
    chunk = tl.program_id(2)
    i = tap // n_jg
    j0 = (tap % n_jg) * G
    vl = tl.arange(0, VEC)
    slot = scratch_ptr + ((chunk * tl.num_programs(1) + tap) * tl.num_programs(0) + cb).to(tl.int64) * (
        TH * BW * BLOCK_C)
    if PAIRS:
        s_base = slot.to(tl.pointer_type(tl.int32), bitcast=True)
    else:
        s_base = slot
    p = tl.arange(0, TILE)
    s_pix = s_base + ((p // TW) * BW + p % TW)[:, None] * VEC + vl[None, :]
    acc0e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc0o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc1e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc1o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc2e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc2o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc3e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc3o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc4e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc4o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc5e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc5o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc6e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc6o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc7e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc7o = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc8e = tl.zeros((TILE, VEC), dtype=tl.float32)
    acc8o = tl.zeros((TILE, VEC), dtype=tl.float32)
    accb = tl.zeros((TILE, BLOCK_C), dtype=tl.float32)
    first = chunk * items_per_chunk
    last = tl.minimum(first + items_per_chunk, n_items)
    for item in range(first, last):
        n, h, w, c, pmask, cmask = _tile(item, cb, C, H, W, tiles_w, tiles_per_img, TH, TW, BLOCK_C, INT64)
        h0, w0 = _tile_origin(item, tiles_w, tiles_per_img, TH, TW, INT64)
        tl.debug_barrier()  # the previous tile's taps have read the slot
        _stage(x_ptr, slot, n, h0 + (i - PT), w0 + (j0 - PL), c, cmask, H, W, sxn, sxc, sxh, sxw,
               pro_scale_ptr, pro_shift_ptr, TH, BW, TILE, BLOCK_C, PRO_ACT)
        tl.debug_barrier()
        mask = pmask[:, None] & cmask[None, :]
        d = tl.load(da_ptr + _offsets(n, h, w, c, sdn, sdc, sdh, sdw), mask=mask, other=0.0).to(tl.float32)
        accb += d
        if PAIRS:
            d_e, d_o = tl.split(tl.reshape(d, (TILE, HALF, 2)))
        else:
            d_e = d
            d_o = d
        acc0e, acc0o = _wg_tap(acc0e, acc0o, d_e, d_o, s_pix, 0, G, j0, KW, VEC, PAIRS)
        acc1e, acc1o = _wg_tap(acc1e, acc1o, d_e, d_o, s_pix, 1, G, j0, KW, VEC, PAIRS)
        acc2e, acc2o = _wg_tap(acc2e, acc2o, d_e, d_o, s_pix, 2, G, j0, KW, VEC, PAIRS)
        acc3e, acc3o = _wg_tap(acc3e, acc3o, d_e, d_o, s_pix, 3, G, j0, KW, VEC, PAIRS)
        acc4e, acc4o = _wg_tap(acc4e, acc4o, d_e, d_o, s_pix, 4, G, j0, KW, VEC, PAIRS)
        acc5e, acc5o = _wg_tap(acc5e, acc5o, d_e, d_o, s_pix, 5, G, j0, KW, VEC, PAIRS)
        acc6e, acc6o = _wg_tap(acc6e, acc6o, d_e, d_o, s_pix, 6, G, j0, KW, VEC, PAIRS)
        acc7e, acc7o = _wg_tap(acc7e, acc7o, d_e, d_o, s_pix, 7, G, j0, KW, VEC, PAIRS)
        acc8e, acc8o = _wg_tap(acc8e, acc8o, d_e, d_o, s_pix, 8, G, j0, KW, VEC, PAIRS)
    part = dwp_ptr + chunk.to(tl.int64) * (KH * KW * C)
    row = i * KW + j0
    if PAIRS:
        ce = cb * BLOCK_C + 2 * vl
    else:
        ce = cb * BLOCK_C + vl
    _wg_store(acc0e, acc0o, part, row, 0, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc1e, acc1o, part, row, 1, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc2e, acc2o, part, row, 2, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc3e, acc3o, part, row, 3, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc4e, acc4o, part, row, 4, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc5e, acc5o, part, row, 5, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc6e, acc6o, part, row, 6, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc7e, acc7o, part, row, 7, G, j0, KW, C, ce, PAIRS)
    _wg_store(acc8e, acc8o, part, row, 8, G, j0, KW, C, ce, PAIRS)
    if tap == 0:
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(dbp_ptr + chunk * C + c, tl.sum(accb, axis=0), mask=c < C)


# ====================================================================== launch configurations


@dataclass(frozen=True)
class TileConfig:
    th: int  # tile rows
    tw: int  # tile columns
    block_c: int  # channels per program
    num_warps: int = 4


_tuner = Autotuner("depthwise_block (triton)")


def default_config(H: int, W: int, C: int, channels_last: bool, device) -> TileConfig:
    if interpreting(device):  # the interpreter's cost grows with the number of programs, not block size
        return TileConfig(min(8, p2(H)), min(8, p2(W)), min(8, p2(C)), 1)
    if channels_last:  # channels are contiguous: wide channel blocks, square pixel tiles
        return TileConfig(min(8, p2(H)), min(8, p2(W)), min(32, p2(C)), 4)
    return TileConfig(min(4, p2(H)), min(32, p2(W)), min(8, p2(C)), 4)


def conv_config(H: int, W: int, C: int, k: int, channels_last: bool, device, kind: str = "train") -> TileConfig:
    """Tiles of the staged conv kernels: the taps read a channel-fastest scratch window in either layout.
    ``kind`` "eval" (the eval forward, whose epilogue keeps little state): 8x16 x 32 channels, 4 pixels
    x 8 channels per thread share each weight load; "train" (the statistics forward): 8x8 x 32, so
    its Welford state fits 4 programs per SM; "dx" (the input gradient): 16x32 x 8, a smaller da halo
    per tile (1.9x the tile at k=9) at 111 registers. Large kernels (k >= 16): 8x16 x 16 for all
    three (16x16 tiles spill and hold fewer programs). (Static sm_90 comparisons, ``convmixer-kernels inspect``.)"""
    if interpreting(device):
        return default_config(H, W, C, channels_last, device)
    if k >= 16:
        return TileConfig(min(8, p2(H)), min(16, p2(W)), min(16, p2(C)), 4)
    th, tw, bc = {"eval": (8, 16, 32), "train": (8, 8, 32), "dx": (16, 32, 8)}[kind]
    return TileConfig(min(th, p2(H)), min(tw, p2(W)), min(bc, p2(C)), 4)


def candidates(H: int, W: int, C: int, channels_last: bool, device, k: int = 1,
               kind: str = "train") -> List[TileConfig]:
    default = conv_config(H, W, C, k, channels_last, device, kind)
    if interpreting(device):
        return [default]
    # a few shapes only: each one is a separate compilation per kernel size on first use
    shapes = [(8, 8, 32, 4), (8, 16, 32, 4), (16, 16, 16, 4), (8, 16, 32, 8), (16, 16, 32, 8), (32, 32, 8, 8)]
    out = [default]
    for th, tw, bc, warps in shapes:
        cfg = TileConfig(min(th, p2(H)), min(tw, p2(W)), min(bc, p2(C)), warps)
        if cfg not in out:
            out.append(cfg)
    return out


def wgrad_config(H: int, W: int, C: int, device) -> TileConfig:
    """Tiles of ``_weight_grad_kernel``: small (G accumulators per element live in registers); one row of
    up to 32 pixels, so the staged x band is (TW + G - 1) / TW = 1.25x the tile at W = 32, k = 9."""
    if interpreting(device):
        return TileConfig(min(4, p2(H)), min(8, p2(W)), min(8, p2(C)), 1)
    return TileConfig(1, min(32, p2(W)), min(16, p2(C)), 2)


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(t.stride())


def _weight_blocks(weight: torch.Tensor, block_c: int, pairs: bool = False) -> torch.Tensor:
    """The depthwise weight [C, 1, KH, KW] as float32 [channel blocks, KH*KW, block_c], channels past C
    zero: each tap's channel vector of a block at a compile-time offset from the block's start.
    ``pairs``: each tap's vector holds the block's even channels, then its odd ones."""
    C = weight.shape[0]
    kk = weight.shape[-2] * weight.shape[-1]
    cblocks = triton.cdiv(C, block_c)
    w = weight.reshape(C, kk).to(torch.float32)
    if cblocks * block_c != C:
        w = torch.cat([w, w.new_zeros(cblocks * block_c - C, kk)])
    w = w.view(cblocks, block_c, kk)
    if pairs:
        w = torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)
    return w.transpose(1, 2).contiguous()


def _grid(cfg: TileConfig, N: int, H: int, W: int, C: int):
    tiles_w = triton.cdiv(W, cfg.tw)
    tiles_per_img = triton.cdiv(H, cfg.th) * tiles_w
    return tiles_w, tiles_per_img, (N * tiles_per_img, triton.cdiv(C, cfg.block_c))


def _layout_key(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), x.device)


# ------------------------------------------------------------------ persistent grids from occupancy

_occupancy_cache = {}


def _blocks_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Resident programs per SM on sm_90: threads, registers (256-register warp granules) and shared memory."""
    warp_regs = triton.cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = 65536 // (warp_regs * num_warps)
    by_threads = 2048 // (32 * num_warps)
    by_smem = (227 * 1024) // (shared + 1024) if shared else 32
    return max(1, min(by_regs, by_threads, by_smem, 32))


def _static_compile(kernel, args, meta):
    """(registers, shared bytes) of ``kernel`` compiled ahead of time for the static target (sm_90), bound
    and specialized as a launch with these arguments would be (``convmixer_kernels.static``'s toolchain)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as jit_mod

    from ...static import toolchain

    backend = make_backend(GPUTarget("cuda", static_active().capability, 32))
    binder = jit_mod.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    c = toolchain.compile_triton(kernel, signature, constexprs, attrs, opts.__dict__)
    return c.resources.registers, c.dynamic_smem + c.resources.static_smem


def _resident(kernel, key, args, meta, device) -> int:
    """Programs of ``kernel`` the GPU holds at once, from the compiled kernel's registers and shared
    memory: on CUDA the kernel compiled for this launch (``warmup``, nothing runs), under the static
    target its sm_90 compile. Any failure of the query falls back to 128 registers (never fails a launch)."""
    num_warps = meta.get("num_warps", 4)
    if key not in _occupancy_cache:
        try:
            if static_active():
                regs, shared = _static_compile(kernel, args, meta)
            else:
                k = kernel.warmup(*args, grid=(1,), **meta)
                if hasattr(k, "_init_handles"):  # registers are known once the module is loaded
                    k._init_handles()
                regs, shared = k.n_regs, k.metadata.shared
        except Exception:
            regs, shared = 128, 0
        _occupancy_cache[key] = _blocks_per_sm(regs, shared, num_warps)
    return _occupancy_cache[key] * num_sms(device)


def _persistent_programs(n_items: int, channel_blocks: int, resident: int, device) -> int:
    """Programs per channel block of a persistent kernel: one wave of the GPU (its real occupancy), so
    the scratch slots of resident programs are the only ones in use."""
    if interpreting(device):
        return max(1, min(n_items, 2))
    return max(1, min(n_items, resident // channel_blocks))


def _prologue_args(prologue: Optional[Affine], dummy: torch.Tensor):
    """(scale, shift, PRO_ACT) kernel arguments of an input-side prologue: its float32 SCALE and SHIFT
    rows, or ``dummy`` twice and -1 without one."""
    if prologue is None:
        return dummy, dummy, -1
    f = prologue.finalized
    return (f[SCALE].to(torch.float32).contiguous(), f[SHIFT].to(torch.float32).contiguous(), int(prologue.act))


def _conv_launch(x, wts, bias, y, a, scale, shift, kernel, pads, act, train, store_a, cfg, int64, bufs,
                 prologue: Optional[Affine] = None):
    """One launch of ``_conv_kernel``; returns the [3, P, C] partials in training (else None). ``bufs``
    caches each configuration's (programs, scratch, partials) outside any timed region. ``prologue``:
    the kernel reads z = affine(x) for x (``_stage``)."""
    N, C, H, W = x.shape
    KH, KW = kernel
    tiles_w, tiles_per_img, (n_items, cblocks) = _grid(cfg, N, H, W, C)
    pairs = x.dtype == torch.bfloat16 and cfg.block_c % 2 == 0
    wt = wts(cfg.block_c, pairs)
    dummy = wt
    pro_scale, pro_shift, pro_act = _prologue_args(prologue, dummy)
    args = [x, wt, bias if bias is not None else dummy, a if store_a else dummy, y,
            scale if scale is not None else dummy, shift if shift is not None else dummy, None, None,
            pro_scale, pro_shift, C, H, W, n_items, tiles_w, tiles_per_img, *_strides(x), *_strides(y)]
    meta = dict(KH=KH, KW=KW, PT=pads[0], PL=pads[1], ACT=act, HAS_BIAS=bias is not None, TRAIN=train,
                STORE_A=store_a, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64, PAIRS=pairs,
                PRO_ACT=pro_act, num_warps=cfg.num_warps)
    slot = (cfg.th + KH - 1) * (cfg.tw + KW - 1) * cfg.block_c
    if cfg not in bufs:
        if not interpreting(x.device):
            probe = list(args)
            probe[7] = empty((3, 1, C), dtype=torch.float32, device=x.device) if train else dummy
            probe[8] = empty((slot,), dtype=x.dtype, device=x.device)
            resident = _resident(_conv_kernel, ("conv",) + _layout_key(x) + (kernel, act, train, store_a, cfg, int64,
                                                                             bias is not None, pro_act),
                                 probe, meta, x.device)
            P = _persistent_programs(n_items, cblocks, resident, x.device)
        else:
            P = _persistent_programs(n_items, cblocks, 0, x.device)
        part = empty((3, P, C), dtype=torch.float32, device=x.device) if train else None
        bufs[cfg] = (P, empty((P * cblocks, slot), dtype=x.dtype, device=x.device), part)
    P, scratch, part = bufs[cfg]
    args[7] = part if train else dummy
    args[8] = scratch
    _conv_kernel[(P, cblocks)](*args, **meta)
    return part


# ====================================================================== the path: tensor cores or CUDA cores

ENV_PATH = "CONVMIXER_KERNELS_DW_PATH"
PATHS = ("tensor_cores", "cuda_cores")
_logged_paths = set()


def requested_path() -> str:
    """``CONVMIXER_KERNELS_DW_PATH``: "auto" (the default, also when unset or empty), "cuda_cores" or "tensor_cores"."""
    value = os.environ.get(ENV_PATH, "").strip() or "auto"
    if value not in ("auto",) + PATHS:
        raise ValueError(f"{ENV_PATH}={value!r}: choose one of 'auto', " + ", ".join(repr(p) for p in PATHS))
    return value


def _layout_name(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "nchw"
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def _path(x: torch.Tensor, weight: torch.Tensor, prologue: Optional[Affine] = None) -> str:
    """"tensor_cores" (``depthwise_tc.py``) or "cuda_cores" (this file's kernels) for one call of ``conv_stats``,
    ``conv_apply`` or ``input_grad``: the one place the Triton backend chooses its depthwise path.

    "auto": ``depthwise_tc.choose_path`` (the static sm_90 rule: tensor cores for bf16/fp16 with k >= 2),
    except that a ``prologue`` always takes the CUDA cores (the tensor-core kernels have none).
    ``CONVMIXER_KERNELS_DW_PATH`` forces a path; forcing "tensor_cores" on a call they cannot run raises
    ``BackendUnavailableError`` naming why. The choice and its reason are logged at INFO once per
    (shape, dtype, layout, kernel size, prologue or not, request). A block's forward and backward see
    the same x, weight and prologue, so they take the same path."""
    TC = _tc()
    mode = requested_path()
    if prologue is not None:
        why_not = "an input-side prologue: the tensor-core kernels have none"
    else:
        why_not = TC.tc_unsupported(x, weight)
    if mode == "tensor_cores":
        if why_not is not None:
            raise BackendUnavailableError(
                f"depthwise_block (triton): {ENV_PATH}=tensor_cores, but this call (input {tuple(x.shape)} "
                f"{x.dtype}, kernel {tuple(weight.shape[-2:])}) cannot run on tensor cores: {why_not}; "
                f"unset {ENV_PATH} (or set it to 'auto') to let the backend choose")
        path, reason = "tensor_cores", f"forced by {ENV_PATH}=tensor_cores"
    elif mode == "cuda_cores":
        path, reason = "cuda_cores", f"forced by {ENV_PATH}=cuda_cores"
    elif why_not is None and TC.choose_path(x, weight) == "tc":
        path, reason = "tensor_cores", (f"{x.dtype} with k >= {TC.MIN_K}: faster on tensor cores by the static "
                                        "sm_90 prediction (depthwise_tc.choose_path)")
    else:
        path, reason = "cuda_cores", why_not or "depthwise_tc.choose_path"
    key = (tuple(x.shape), x.dtype, _layout_name(x), tuple(weight.shape[-2:]), prologue is not None, mode)
    if key not in _logged_paths:
        _logged_paths.add(key)
        log_event(logging.INFO, "depthwise_block (triton): %s path for input %s %s %s, kernel %s%s (%s)", path,
                  key[0], x.dtype, key[2], key[3], " with a prologue" if prologue is not None else "", reason)
    return path


def _tc():
    """The tensor-core launchers, imported on first use, not at the top: ``depthwise_tc`` imports this module's
    helpers (``_tile``, ``_offsets``, ``_strides``, ``default_config``, ``grad_sums``, ``apply``)."""
    from . import depthwise_tc

    return depthwise_tc


# ====================================================================== the contract (ops/depthwise_block.py)


def unsupported(**config) -> Optional[str]:
    """Limits of this backend beyond the contract's own checks: none (any k, any strides, int64 offsets; the
    tensor-core path is taken only where it runs, see ``_path``)."""
    return None


def conv_stats(x, weight, bias, act: int, pads: Tuple[int, int], prologue: Optional[Affine] = None):
    """a = dwconv(x) + b in x's dtype and layout, and the [3, P, C] partials of act(a) (one row per program).
    ``prologue`` (``prologue.Affine``): the conv reads z = act(x) * s + t (rounded to x's dtype) instead of
    x, zero padded as z: the result of ``conv_stats(affine_reference(x, prologue), ...)`` with no pass for z.
    On the tensor-core path (``_path``) the partials have one row per tile."""
    if _path(x, weight, prologue) == "tensor_cores":
        return _tc().conv_stats(x, weight, bias, act, pads)
    N, C, H, W = x.shape
    kernel = tuple(weight.shape[-2:])
    a = empty_output(x)
    wts = _weights_per_block(weight)
    bufs = {}
    int64 = needs_int64(x, a)
    cands = candidates(H, W, C, x.is_contiguous(memory_format=torch.channels_last), x.device, max(kernel))

    def launch(cfg, a_out):
        return _conv_launch(x, wts, bias, a_out, a_out, None, None, kernel, pads, act, True, True, cfg, int64, bufs,
                            prologue)

    if len(cands) > 1:
        scratch = empty_like(x)
        pro_key = -1 if prologue is None else int(prologue.act)
        cfg = _tuner.pick(("conv_stats",) + _layout_key(x) + (kernel, act, pro_key), cands,
                          lambda c: launch(c, scratch))
    else:
        cfg = cands[0]
    part = launch(cfg, a)
    return a, part


def apply(a, x, finalized, act: int):
    """y = act(a) * scale + shift + x (finalized: the [6, C] statistics)."""
    N, C, H, W = x.shape
    y = empty_output(x)
    cfg = default_config(H, W, C, x.is_contiguous(memory_format=torch.channels_last), x.device)
    tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
    _apply_kernel[grid](x, a, y, finalized[SCALE], finalized[SHIFT], C, H, W, tiles_w, tiles_per_img,
                        *_strides(x), *_strides(y), ACT=act, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c,
                        INT64=needs_int64(x, y), num_warps=cfg.num_warps)
    return y


def conv_apply(x, weight, bias, finalized, act: int, pads: Tuple[int, int], store_a: bool):
    """Eval: y = act(dwconv(x) + b) * scale + shift + x in one kernel; a kept only if ``store_a``."""
    if _path(x, weight) == "tensor_cores":
        return _tc().conv_apply(x, weight, bias, finalized, act, pads, store_a)
    N, C, H, W = x.shape
    kernel = tuple(weight.shape[-2:])
    y = empty_output(x)
    a = empty_output(x) if store_a else x.new_empty(0)
    wts = _weights_per_block(weight)
    bufs = {}
    int64 = needs_int64(x, y)
    scale, shift = finalized[SCALE], finalized[SHIFT]
    cands = candidates(H, W, C, x.is_contiguous(memory_format=torch.channels_last), x.device, max(kernel), "eval")

    def launch(cfg, y_out, a_out):
        _conv_launch(x, wts, bias, y_out, a_out, scale, shift, kernel, pads, act, False, store_a, cfg, int64, bufs)

    if len(cands) > 1:
        y2, a2 = empty_like(y), empty_like(y) if store_a else a
        cfg = _tuner.pick(("conv_apply",) + _layout_key(x) + (kernel, act, store_a), cands,
                          lambda c: launch(c, y2, a2))
    else:
        cfg = cands[0]
    launch(cfg, y, a)
    return y, a


def grad_sums(dy, a, stats, act: int):
    """[2, C] float32: (sum dy, sum dy * xhat) per channel, xhat = (act(a) - mean) * rstd."""
    N, C, H, W = a.shape
    cfg = default_config(H, W, C, a.is_contiguous(memory_format=torch.channels_last), a.device)
    tiles_w, tiles_per_img, (n_items, cblocks) = _grid(cfg, N, H, W, C)
    chunks = _chunks(n_items, cblocks, a.device)
    per_chunk = triton.cdiv(n_items, chunks)
    chunks = triton.cdiv(n_items, per_chunk)
    part = empty((chunks, 2, C), dtype=torch.float32, device=a.device)
    _reduce_kernel[(chunks, cblocks)](dy, a, stats[MEAN], stats[RSTD], part, C, H, W, n_items, per_chunk, tiles_w,
                                      tiles_per_img, *_strides(dy), *_strides(a), ACT=act, TH=cfg.th, TW=cfg.tw,
                                      BLOCK_C=cfg.block_c, INT64=needs_int64(dy, a),
                                      EVEN=H % cfg.th == 0 and W % cfg.tw == 0 and C % cfg.block_c == 0,
                                      num_warps=cfg.num_warps)
    return sum_rows(part)


def _chunks(n_items: int, programs_per_chunk: int, device) -> int:
    """Chunks of whole tiles for the reduction kernels: 8 waves of 8 programs per SM (a small quantized
    tail), each chunk's tiles added in registers in order (one reduction per program)."""
    if interpreting(device):
        return min(n_items, 2)
    return max(1, min(n_items, triton.cdiv(8 * 8 * num_sms(device), programs_per_chunk)))


def _weights_per_block(weight: torch.Tensor):
    """block_c -> ``_weight_blocks(weight, block_c)``, built once per block width."""
    cache = {}

    def get(block_c: int, pairs: bool = False) -> torch.Tensor:
        if (block_c, pairs) not in cache:
            cache[block_c, pairs] = _weight_blocks(weight, block_c, pairs)
        return cache[block_c, pairs]

    return get


def _wgrad_groups(KW: int) -> Tuple[int, int]:
    """(G, groups): column taps per ``_weight_grad_kernel`` program (at most 9 accumulators) and groups per row."""
    if KW <= 9:
        return KW, 1
    groups = triton.cdiv(KW, 8)
    return triton.cdiv(KW, groups), groups


def _weight_grad(da, x, KH: int, KW: int, pads, int64: bool, prologue: Optional[Affine] = None):
    """(dw [KH*KW, C], db [C]) float32 from the stored da and x (z = affine(x) with a ``prologue``):
    per-chunk partials, summed in a fixed order."""
    N, C, H, W = x.shape
    dev = x.device
    cfg = wgrad_config(H, W, C, dev)
    tiles_w, tiles_per_img, (n_items, cblocks) = _grid(cfg, N, H, W, C)
    G, n_jg = _wgrad_groups(KW)
    taps = KH * n_jg
    chunks = _chunks(n_items, cblocks * taps, dev)
    per_chunk = triton.cdiv(n_items, chunks)
    chunks = triton.cdiv(n_items, per_chunk)
    f32 = dict(dtype=torch.float32, device=dev)
    dwp = empty((chunks, KH * KW, C), **f32)
    dbp = empty((chunks, C), **f32)
    scratch = empty((chunks * taps * cblocks, cfg.th * (cfg.tw + G - 1) * cfg.block_c), dtype=x.dtype, device=dev)
    pro_scale, pro_shift, pro_act = _prologue_args(prologue, dbp)
    _weight_grad_kernel[(cblocks, taps, chunks)](
        da, x, dwp, dbp, scratch, pro_scale, pro_shift, C, H, W, n_items, tiles_w, tiles_per_img, per_chunk, n_jg,
        *_strides(da), *_strides(x), KH=KH, KW=KW, PT=pads[0], PL=pads[1], G=G, TH=cfg.th, TW=cfg.tw,
        BLOCK_C=cfg.block_c, INT64=int64, PAIRS=x.dtype == torch.bfloat16 and cfg.block_c % 2 == 0,
        PRO_ACT=pro_act, num_warps=cfg.num_warps)
    return sum_rows(dwp), sum_rows(dbp)


def input_grad(dy, a, x, weight, coef, act: int, pads: Tuple[int, int], train: bool, need_dx: bool,
               need_dw: bool, need_db: bool, prologue: Optional[Affine] = None):
    """(dx, dw, db): dx = dy + dwconv^T(da), dw and db float32-accumulated in the weight's dtype, with
    da = act'(a) * (k1*(dy - mean_dy) + k2*(act(a) - mean)), coef = [4, C] (k1, k2, mean_dy, mean). A gradient
    not asked for is an empty tensor. ``_input_grad_kernel`` computes da once (with its halo, for dx) and
    stores each tile's own da when dw or db is asked for; ``_weight_grad_kernel`` reads it with x.
    ``prologue`` (``prologue.Affine``): the forward read z = affine(x), so dw = sum da * z, z built as
    ``_weight_grad_kernel`` stages x (zero padded as z); dx stays the gradient with respect to z, and
    dy, a and db do not depend on it. Tensor-core path (``_path``): ``depthwise_tc.input_grad``."""
    if _path(x, weight, prologue) == "tensor_cores":
        return _tc().input_grad(dy, a, x, weight, coef, act, pads, train, need_dx, need_dw, need_db)
    N, C, H, W = x.shape
    KH, KW = weight.shape[-2:]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    need_w = need_dw or need_db
    dx = empty_output(x) if need_dx else x.new_empty(0)
    da = empty_output(x) if need_w else None
    int64 = needs_int64(x, a, dy) or (need_dx and needs_int64(dx))
    wts = _weights_per_block(weight)
    # the prologue changes _weight_grad_kernel only (not tuned here); kept in the key as in conv_stats'
    key = ("input_grad",) + _layout_key(x) + ((KH, KW), act, train, need_dx, need_w,
                                              -1 if prologue is None else int(prologue.act))
    cands = candidates(H, W, C, x.is_contiguous(memory_format=torch.channels_last), dev, max(KH, KW), "dx")
    buffers = {}

    def launch(cfg, dx_out, da_out):
        tiles_w, tiles_per_img, (n_items, cblocks) = _grid(cfg, N, H, W, C)
        region = (cfg.th + KH - 1) * (cfg.tw + KW - 1) * cfg.block_c
        wt = wts(cfg.block_c)
        args = [dy, a, wt, coef, dx_out if need_dx else dy, da_out if need_w else dy, None,
                C, H, W, n_items, tiles_w, tiles_per_img, *_strides(dy), *_strides(a)]
        meta = dict(KH=KH, KW=KW, PT=pads[0], PL=pads[1], ACT=act, TRAIN=train, NEED_DX=need_dx, STORE_DA=need_w,
                    TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64, num_warps=cfg.num_warps)
        if cfg not in buffers:
            resident = 0
            if not interpreting(dev):
                probe = list(args)
                probe[6] = empty((region,), **f32)
                resident = _resident(_input_grad_kernel, key + (cfg, int64), probe, meta, dev)
            P = _persistent_programs(n_items, cblocks, resident, dev)
            buffers[cfg] = (P, empty((P * cblocks, region), **f32))
        P, args[6] = buffers[cfg]
        _input_grad_kernel[(P, cblocks)](*args, **meta)

    if len(cands) > 1:
        dx2 = empty_like(dx) if need_dx else None
        da2 = empty_like(da) if need_w else None
        cfg = _tuner.pick(key, cands, lambda c: launch(c, dx2, da2))
    else:
        cfg = cands[0]
    launch(cfg, dx, da)
    dw = db = x.new_empty(0)
    if need_w:
        dwk, dbk = _weight_grad(da, x, KH, KW, pads, needs_int64(x, da), prologue)
        if need_dw:
            dw = dwk.t().contiguous().view(weight.shape).to(weight.dtype)
        if need_db:
            db = dbk.to(weight.dtype)
    return dx, dw, db
