"""Triton backend of the depthwise block (``ops/depthwise_block.py`` holds the op's contract).

Kernels (top) and the contract's launchers (bottom). One unit = one read or write of an
N*C*H*W tensor:

* training forward (5): ``conv_stats`` (``_conv_kernel``) reads x, stores the pre-activation a
  and per-tile statistics of act(a); ``finalize`` combines them in a fixed order; ``apply``
  (``_apply_kernel``) reads a and x, writes y.
* eval forward (2, or 3 when a is kept for a backward): ``conv_apply``, one ``_conv_kernel``
  launch reads x and writes y.
* backward (6): ``grad_sums`` (``_reduce_kernel``) reads dy and a for sum(dy) and sum(dy * xhat);
  ``input_grad`` (``_input_grad_kernel``) recomputes da = act'(a) * BN_bwd(dy) over each tile and
  its halo once (into a small per-program scratch, sized to stay in L1/L2), then reads it back
  shifted for dx = dy + dwconv^T(da), and multiplies it with shifted x for per-program partials
  of dw and db, summed afterwards by ``common.sum_rows`` in a fixed order.

Tile shapes: fixed under the interpreter; on CUDA the conv and backward kernels try a few shapes
on first use of a (shape, dtype, layout, kernel) through ``common.Autotuner``, except in
deterministic mode (``tuning.autotune_enabled``). Every kernel takes the strides of each tensor
it touches, so NCHW, channels_last and strided views run without copies; offsets switch to int64
when a tensor spans 2**31 elements or more (``common.needs_int64``).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..alloc import empty, empty_like, empty_output
from ..batchnorm import SCALE, SHIFT, MEAN, RSTD
from .activation import act_fwd, act_grad
from .batchnorm import finalize, tile_stats  # noqa: F401  (finalize is part of this backend's contract)
from .common import Autotuner, interpreting, needs_int64, num_sms, p2, sum_rows

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
def _conv_kernel(x_ptr, wt_ptr, b_ptr, a_ptr, y_ptr, scale_ptr, shift_ptr, part_ptr,
                 C, H, W, T, tiles_w, tiles_per_img,
                 sxn, sxc, sxh, sxw, son, soc, soh, sow,
                 KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAIN: tl.constexpr, STORE_A: tl.constexpr,
                 TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """a = dwconv(x) + b over one tile. TRAIN: store a and the tile's (count, mean, M2) of act(a)
    into partials [3, T, C]. Eval: y = act(a) * scale + shift + x, storing a only if asked."""
    pid_t = tl.program_id(0)
    n, h, w, c, pmask, cmask = _tile(pid_t, tl.program_id(1), C, H, W, tiles_w, tiles_per_img,
                                     TH, TW, BLOCK_C, INT64)
    mask = pmask[:, None] & cmask[None, :]
    x_img = x_ptr + n * sxn + (c * sxc)[None, :]
    acc = tl.zeros((TH * TW, BLOCK_C), dtype=tl.float32)
    for i in range(KH):
        hh = h + (i - PT)
        hok = pmask & (hh >= 0) & (hh < H)
        x_row = x_img + (hh * sxh)[:, None]
        for j in range(KW):
            ww = w + (j - PL)
            m = hok & (ww >= 0) & (ww < W)  # zero padding
            xv = tl.load(x_row + (ww * sxw)[:, None], mask=m[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(wt_ptr + (i * KW + j) * C + c, mask=cmask, other=0.0)  # weight as [KH*KW, C]
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # a is rounded to the activation dtype before use: statistics, y and the backward all see
    # the stored value, so they agree with each other
    a = acc.to(y_ptr.dtype.element_ty)
    o_off = _offsets(n, h, w, c, son, soc, soh, sow)
    if STORE_A:
        tl.store(a_ptr + o_off, a, mask=mask)
    g = act_fwd(a.to(tl.float32), ACT)
    if TRAIN:
        count, mean, m2 = tile_stats(g, mask, 0)
        tl.store(part_ptr + pid_t * C + c, count, mask=cmask)
        tl.store(part_ptr + (T + pid_t) * C + c, mean, mask=cmask)
        tl.store(part_ptr + (2 * T + pid_t) * C + c, m2, mask=cmask)
    else:
        s = tl.load(scale_ptr + c, mask=cmask, other=0.0)
        t = tl.load(shift_ptr + c, mask=cmask, other=0.0)
        xc = tl.load(x_ptr + _offsets(n, h, w, c, sxn, sxc, sxh, sxw), mask=mask, other=0.0)
        y = g * s[None, :] + t[None, :] + xc.to(tl.float32)
        tl.store(y_ptr + o_off, y.to(y_ptr.dtype.element_ty), mask=mask)


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
def _reduce_kernel(dy_ptr, a_ptr, mean_ptr, rstd_ptr, part_ptr, C, H, W, tiles_w, tiles_per_img,
                   sgn, sgc, sgh, sgw, son, soc, soh, sow, ACT: tl.constexpr,
                   TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Per-tile sum(dy) and sum(dy * xhat), xhat = (act(a) - mean) * rstd, into partials [T, 2, C]."""
    pid_t = tl.program_id(0)
    n, h, w, c, pmask, cmask = _tile(pid_t, tl.program_id(1), C, H, W, tiles_w, tiles_per_img,
                                     TH, TW, BLOCK_C, INT64)
    mask = pmask[:, None] & cmask[None, :]
    dy = tl.load(dy_ptr + _offsets(n, h, w, c, sgn, sgc, sgh, sgw), mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + _offsets(n, h, w, c, son, soc, soh, sow), mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0)
    xhat = tl.where(mask, (act_fwd(a, ACT) - mean[None, :]) * rstd[None, :], 0.0)
    tl.store(part_ptr + pid_t * 2 * C + c, tl.sum(dy, axis=0), mask=cmask)
    tl.store(part_ptr + (pid_t * 2 + 1) * C + c, tl.sum(dy * xhat, axis=0), mask=cmask)


@triton.jit
def _input_grad_kernel(dy_ptr, a_ptr, x_ptr, wt_ptr, coef_ptr, dx_ptr, scratch_ptr, dwp_ptr, dbp_ptr,
                       C, H, W, n_items, tiles_w, tiles_per_img,
                       sgn, sgc, sgh, sgw, son, soc, soh, sow, sxn, sxc, sxh, sxw,
                       KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                       ACT: tl.constexpr, TRAIN: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                       TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """dx = dy + dwconv^T(da) and per-program partials of dw and db, da recomputed from (dy, a).

    da = act'(a) * (k1*(dy - mean_dy) + k2*(act(a) - mean)) with per-channel coef [4, C] = (k1, k2, mean_dy, mean).
    Persistent: program (p, cb) walks tiles p, p + P, ... of channel block cb in a fixed order, so
    its partials dw [P, KH*KW, C] and db [P, C] are deterministic. A tile's da over the tile plus
    its halo is computed once into the program's scratch slot, then read back shifted (Triton
    cannot index shared memory; the slot is small and stays in L1/L2).
    """
    RW: tl.constexpr = TW + KW - 1
    REGION: tl.constexpr = (TH + KH - 1) * RW
    TILE: tl.constexpr = TH * TW
    pid_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cl = tl.arange(0, BLOCK_C)
    cc = tl.program_id(1) * BLOCK_C + cl
    k1 = tl.load(coef_ptr + cc, mask=cc < C, other=0.0)
    k2 = tl.load(coef_ptr + C + cc, mask=cc < C, other=0.0)
    mean_dy = tl.load(coef_ptr + 2 * C + cc, mask=cc < C, other=0.0)
    mean = tl.load(coef_ptr + 3 * C + cc, mask=cc < C, other=0.0)
    scratch = scratch_ptr + (tl.program_id(1) * n_prog + pid_p).to(tl.int64) * (REGION * BLOCK_C)
    p = tl.arange(0, TILE)
    # scratch position of output pixel p's tap (KH-1, KW-1); tap (i, j) is (i*RW + j) rows before it
    s_out = scratch + ((p // TW + KH - 1) * RW + p % TW + KW - 1)[:, None] * BLOCK_C + cl[None, :]
    for item in range(pid_p, n_items, n_prog):
        n, h, w, c, pmask, cmask = _tile(item, tl.program_id(1), C, H, W, tiles_w, tiles_per_img,
                                         TH, TW, BLOCK_C, INT64)
        t = item % tiles_per_img
        h0 = (t // tiles_w) * TH
        w0 = (t % tiles_w) * TW
        if INT64:
            h0 = h0.to(tl.int64)
            w0 = w0.to(tl.int64)
        # 1. da over rows [h0 + PT - (KH-1), h0 + TH + PT) and columns [w0 + PL - (KW-1), w0 + TW + PL),
        #    zero outside the feature map (the transposed conv has no padding of its own)
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
            tl.store(scratch + r[:, None] * BLOCK_C + cl[None, :], da, mask=(r < REGION)[:, None])
        tl.debug_barrier()  # the region was written by all threads and is read back shifted

        mask = pmask[:, None] & cmask[None, :]
        if NEED_DX:
            acc = tl.zeros((TILE, BLOCK_C), dtype=tl.float32)
            for i in range(KH):
                for j in range(KW):
                    # dx[h, w] += w[i, j] * da[h + PT - i, w + PL - j]: the flipped kernel
                    d = tl.load(s_out - (i * RW + j) * BLOCK_C)
                    wv = tl.load(wt_ptr + (i * KW + j) * C + c, mask=cmask, other=0.0)
                    acc += d * wv.to(tl.float32)[None, :]
            dyc = tl.load(dy_ptr + _offsets(n, h, w, c, sgn, sgc, sgh, sgw), mask=mask, other=0.0)
            tl.store(dx_ptr + _offsets(n, h, w, c, son, soc, soh, sow),
                     (acc + dyc.to(tl.float32)).to(dx_ptr.dtype.element_ty), mask=mask)  # + the residual's
        if NEED_DW:
            # the tile's own da (zero at pixels outside the map) times x shifted by each tap
            d = tl.load(s_out - (PT * RW + PL) * BLOCK_C)  # tap (PT, PL) is the pixel itself
            db_ptrs = dbp_ptr + pid_p * C + c
            tl.store(db_ptrs, tl.load(db_ptrs, mask=cmask, other=0.0) + tl.sum(d, axis=0), mask=cmask)
            x_img = x_ptr + n * sxn + (c * sxc)[None, :]
            for i in range(KH):
                hh = h + (i - PT)
                hok = pmask & (hh >= 0) & (hh < H)
                x_row = x_img + (hh * sxh)[:, None]
                for j in range(KW):
                    ww = w + (j - PL)
                    m = hok & (ww >= 0) & (ww < W)
                    xv = tl.load(x_row + (ww * sxw)[:, None], mask=m[:, None] & cmask[None, :], other=0.0)
                    dw_ptrs = dwp_ptr + (pid_p * (KH * KW) + i * KW + j) * C + c
                    part = tl.load(dw_ptrs, mask=cmask, other=0.0) + tl.sum(d * xv.to(tl.float32), axis=0)
                    tl.store(dw_ptrs, part, mask=cmask)
        tl.debug_barrier()  # before the next tile overwrites the slot and re-reads the partials



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


def candidates(H: int, W: int, C: int, channels_last: bool, device) -> List[TileConfig]:
    default = default_config(H, W, C, channels_last, device)
    if interpreting(device):
        return [default]
    # a few shapes only: each one is a separate compilation per kernel size on first use
    shapes = [(8, 8, 32, 4), (16, 16, 16, 8), (8, 16, 32, 8), (4, 32, 8, 4), (8, 32, 16, 8), (32, 32, 8, 8)]
    out = [default]
    for th, tw, bc, warps in shapes:
        cfg = TileConfig(min(th, p2(H)), min(tw, p2(W)), min(bc, p2(C)), warps)
        if cfg not in out:
            out.append(cfg)
    return out


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(t.stride())


def _weight_taps(weight: torch.Tensor) -> torch.Tensor:
    """The depthwise weight [C, 1, KH, KW] as [KH*KW, C]: one contiguous channel vector per tap."""
    C = weight.shape[0]
    return weight.reshape(C, -1).t().contiguous()


def _grid(cfg: TileConfig, N: int, H: int, W: int, C: int):
    tiles_w = triton.cdiv(W, cfg.tw)
    tiles_per_img = triton.cdiv(H, cfg.th) * tiles_w
    return tiles_w, tiles_per_img, (N * tiles_per_img, triton.cdiv(C, cfg.block_c))


def _layout_key(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), x.device)


def _conv_launch(x, wt, bias, y, a, scale, shift, part, kernel, pads, act, train, store_a, cfg, int64):
    """One launch of ``_conv_kernel`` (``part``: the [3, T, C] partials in training, else None)."""
    N, C, H, W = x.shape
    tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
    dummy = wt
    _conv_kernel[grid](
        x, wt, bias if bias is not None else dummy, a if store_a else dummy, y,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        part if part is not None else dummy,
        C, H, W, grid[0], tiles_w, tiles_per_img, *_strides(x), *_strides(y),
        KH=kernel[0], KW=kernel[1], PT=pads[0], PL=pads[1], ACT=act, HAS_BIAS=bias is not None,
        TRAIN=train, STORE_A=store_a, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64,
        num_warps=cfg.num_warps)


# ====================================================================== the contract (ops/depthwise_block.py)


def unsupported(**config) -> Optional[str]:
    """Limits of this backend beyond the contract's own checks: none (any k, any strides, int64 offsets)."""
    return None


def conv_stats(x, weight, bias, act: int, pads: Tuple[int, int]):
    """a = dwconv(x) + b in x's dtype and layout, and the [3, T, C] partials of act(a)."""
    N, C, H, W = x.shape
    kernel = tuple(weight.shape[-2:])
    a = empty_output(x)
    wt = _weight_taps(weight)
    int64 = needs_int64(x, a)
    cands = candidates(H, W, C, x.is_contiguous(memory_format=torch.channels_last), x.device)
    parts = {}

    def part_for(cfg):
        if cfg not in parts:
            parts[cfg] = empty((3, _grid(cfg, N, H, W, C)[2][0], C), dtype=torch.float32, device=x.device)
        return parts[cfg]

    def launch(cfg, a_out):
        _conv_launch(x, wt, bias, a_out, a_out, None, None, part_for(cfg), kernel, pads, act, True, True, cfg, int64)

    if len(cands) > 1:
        scratch = empty_like(x)
        cfg = _tuner.pick(("conv_stats",) + _layout_key(x) + (kernel, act), cands, lambda c: launch(c, scratch))
    else:
        cfg = cands[0]
    launch(cfg, a)
    return a, parts[cfg]


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
    N, C, H, W = x.shape
    kernel = tuple(weight.shape[-2:])
    y = empty_output(x)
    a = empty_output(x) if store_a else x.new_empty(0)
    wt = _weight_taps(weight)
    int64 = needs_int64(x, y)
    scale, shift = finalized[SCALE], finalized[SHIFT]
    cands = candidates(H, W, C, x.is_contiguous(memory_format=torch.channels_last), x.device)

    def launch(cfg, y_out, a_out):
        _conv_launch(x, wt, bias, y_out, a_out, scale, shift, None, kernel, pads, act, False, store_a, cfg, int64)

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
    tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
    part = empty((grid[0], 2, C), dtype=torch.float32, device=a.device)
    _reduce_kernel[grid](dy, a, stats[MEAN], stats[RSTD], part, C, H, W, tiles_w, tiles_per_img, *_strides(dy),
                         *_strides(a), ACT=act, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c,
                         INT64=needs_int64(dy, a), num_warps=cfg.num_warps)
    return sum_rows(part)


def _persistent_programs(n_items: int, channel_blocks: int, device) -> int:
    """Programs per channel block for the persistent backward kernel: enough to fill the GPU a few
    times over, few enough that the scratch slots stay cache-resident."""
    if interpreting(device):
        return max(1, min(n_items, 2))
    return max(1, min(n_items, triton.cdiv(4 * num_sms(device), channel_blocks)))


def input_grad(dy, a, x, weight, coef, act: int, pads: Tuple[int, int], train: bool, need_dx: bool,
               need_dw: bool, need_db: bool):
    """(dx, dw, db): dx = dy + dwconv^T(da), dw and db float32-accumulated in the weight's dtype, with
    da = act'(a) * (k1*(dy - mean_dy) + k2*(act(a) - mean)), coef = [4, C] (k1, k2, mean_dy, mean). A gradient
    not asked for is an empty tensor."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[-2:]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    dx = empty_output(x) if need_dx else x.new_empty(0)
    int64 = needs_int64(x, a, dy) or (need_dx and needs_int64(dx))
    wt = _weight_taps(weight)
    key = ("input_grad",) + _layout_key(x) + ((KH, KW), act, train, need_dx, need_dw or need_db)
    cands = candidates(H, W, C, x.is_contiguous(memory_format=torch.channels_last), dev)
    buffers = {}

    def buffers_for(cfg):
        if cfg not in buffers:
            tiles_w, tiles_per_img, (n_items, cblocks) = _grid(cfg, N, H, W, C)
            P = _persistent_programs(n_items, cblocks, dev)
            region = (cfg.th + KH - 1) * (cfg.tw + KW - 1)
            buffers[cfg] = (P, empty((P * cblocks, region, cfg.block_c), **f32), torch.zeros((P, KH * KW, C), **f32),
                            torch.zeros((P, C), **f32))
        return buffers[cfg]

    def launch(cfg, dx_out):
        tiles_w, tiles_per_img, (n_items, cblocks) = _grid(cfg, N, H, W, C)
        P, scratch, dwp, dbp = buffers_for(cfg)
        dwp.zero_()
        dbp.zero_()
        _input_grad_kernel[(P, cblocks)](
            dy, a, x, wt, coef, dx_out if need_dx else dy, scratch, dwp, dbp,
            C, H, W, n_items, tiles_w, tiles_per_img, *_strides(dy), *_strides(a), *_strides(x),
            KH=KH, KW=KW, PT=pads[0], PL=pads[1], ACT=act, TRAIN=train, NEED_DX=need_dx,
            NEED_DW=need_dw or need_db, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64,
            num_warps=cfg.num_warps)

    if len(cands) > 1:
        dx2 = empty_like(dx) if need_dx else None
        cfg = _tuner.pick(key, cands, lambda c: launch(c, dx2))
    else:
        cfg = cands[0]
    launch(cfg, dx)
    _, _, dwp, dbp = buffers[cfg]
    dw = sum_rows(dwp).t().contiguous().view(weight.shape).to(weight.dtype) if need_dw else x.new_empty(0)
    db = sum_rows(dbp).to(weight.dtype) if need_db else x.new_empty(0)
    return dx, dw, db
