"""Depthwise block: y = x + BN(act(dwconv(x, w) + b)), design.md section 3.1.

This file holds the op's Triton kernels (top), their host launchers (middle), the
``torch.library`` ops with their autograd formula, and the reference
(``depthwise_block_reference``), the front function (``depthwise_block``) and the
backend registrations (bottom). Every backend's implementation takes the
reference's exact signature.

Triton path, per call (one unit = one read or write of an N*C*H*W tensor):

* training forward (5): ``_conv_kernel`` reads x, stores the pre-activation a and
  per-tile statistics of act(a); ``batchnorm.finalize`` combines them in tile order
  and updates the running buffers; ``_apply_kernel`` reads a and x, writes y.
* eval forward (2, or 3 when a gradient will be needed and a is kept): one
  ``_conv_kernel`` launch reads x and writes y.
* backward (6): ``_reduce_kernel`` reads dy and a for sum(dy) and sum(dy * xhat);
  ``_input_grad_kernel`` recomputes da = act'(a) * BN_bwd(dy) over each tile and its
  halo once (into a small per-program scratch, sized to stay in L1/L2), then reads
  it back shifted for dx = dy + dwconv^T(da), and multiplies it with shifted x for
  per-program partials of dw and db. Every reduction over tiles or programs runs in
  a fixed order (``_sum_rows_kernel``): results are bitwise reproducible.

Tile shapes: fixed under the interpreter; on CUDA the conv and backward kernels try a
few shapes on first use of a (shape, dtype, layout, kernel) and cache the fastest,
except where ``tuning.autotune_enabled()`` says no (deterministic mode keeps the
default shapes, so that the reduction order cannot change between runs).

Layouts: every kernel takes the strides of each tensor it touches, so NCHW,
channels_last and strided views run without copies (channels_last is the fast
path: a tile's channels are contiguous). Offsets switch to int64 when a tensor
spans 2**31 elements or more.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import backends
from .activation import ACT_CODE, activation_reference
from .alloc import empty, empty_like
from .batchnorm import BatchNormCall, eval_stats, finalize
from .dispatch import common_unsupported, run_block
from .tuning import autotune_enabled

try:
    import triton
    import triton.language as tl

    from .activation_triton import act_fwd, act_grad
    from .batchnorm_triton import tile_stats
except ImportError:  # no triton (it installs on Linux only): the reference still works, the backend says why not
    import types

    # lets the kernel definitions below be defined; they are never launched without triton
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)

OP = "depthwise_block"

Padding = Union[str, Tuple[int, int]]

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

    da = act'(a) * (k1*dy + k2*(act(a) - mean) + k3) with per-channel coef [4, C] = (k1, k2, k3, mean).
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
    k3 = tl.load(coef_ptr + 2 * C + cc, mask=cc < C, other=0.0)
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
            dg = k1[None, :] * dy
            if TRAIN:  # the batch-statistics terms of BatchNorm's backward
                dg += k2[None, :] * (act_fwd(a, ACT) - mean[None, :]) + k3[None, :]
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


@triton.jit
def _sum_rows_kernel(src_ptr, out_ptr, R, L, BLOCK: tl.constexpr):
    """out[l] = sum over r of src[r, l], r in increasing order (deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(R):
        acc += tl.load(src_ptr + r * L + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, acc, mask=mask)


# ====================================================================== host launchers


@dataclass(frozen=True)
class TileConfig:
    th: int  # tile rows
    tw: int  # tile columns
    block_c: int  # channels per program
    num_warps: int = 4


_CONFIG_CACHE: Dict[tuple, TileConfig] = {}


def _interpreting(device: torch.device) -> bool:
    return device.type != "cuda"


def _p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _default_config(H: int, W: int, C: int, channels_last: bool, device) -> TileConfig:
    if _interpreting(device):  # the interpreter's cost grows with the number of programs, not block size
        return TileConfig(min(8, _p2(H)), min(8, _p2(W)), min(8, _p2(C)), 1)
    if channels_last:  # channels are contiguous: wide channel blocks, square pixel tiles
        return TileConfig(min(8, _p2(H)), min(8, _p2(W)), min(32, _p2(C)), 4)
    return TileConfig(min(4, _p2(H)), min(32, _p2(W)), min(8, _p2(C)), 4)


def _candidates(H: int, W: int, C: int, channels_last: bool, device) -> List[TileConfig]:
    default = _default_config(H, W, C, channels_last, device)
    if _interpreting(device):
        return [default]
    # a few shapes only: each one is a separate compilation per kernel size on first use
    shapes = [(8, 8, 32, 4), (16, 16, 16, 8), (8, 16, 32, 8), (4, 32, 8, 4), (8, 32, 16, 8), (32, 32, 8, 8)]
    out = [default]
    for th, tw, bc, warps in shapes:
        cfg = TileConfig(min(th, _p2(H)), min(tw, _p2(W)), min(bc, _p2(C)), warps)
        if cfg not in out:
            out.append(cfg)
    return out


def _pick_config(kind: str, key: tuple, candidates: List[TileConfig], bench) -> TileConfig:
    """The fastest candidate for (kind, key), measured once per process and cached; the first
    (default) one where ``tuning.autotune_enabled()`` says no (interpreter, autotuning off, or
    deterministic mode: a timing-dependent choice could change the reduction order between runs)."""
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    full_key = (kind,) + key
    cfg = _CONFIG_CACHE.get(full_key)
    if cfg is None:
        from triton.testing import do_bench

        best = (float("inf"), candidates[0])
        for cand in candidates:
            try:
                t = do_bench(lambda: bench(cand), warmup=5, rep=20)
            except Exception:  # a configuration that does not compile or fit on this GPU
                continue
            best = min(best, (t, cand), key=lambda b: b[0])
        cfg = _CONFIG_CACHE[full_key] = best[1]
    return cfg


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(t.stride())


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element offset of some tensor does not fit in int32."""
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0
        if span >= 2 ** 31 - 1 or t.numel() >= 2 ** 31 - 1:
            return True
    return False


def _weight_taps(weight: torch.Tensor) -> torch.Tensor:
    """The depthwise weight [C, 1, KH, KW] as [KH*KW, C]: one contiguous channel vector per tap."""
    C = weight.shape[0]
    return weight.reshape(C, -1).t().contiguous()


def _grid(cfg: TileConfig, N: int, H: int, W: int, C: int):
    tiles_w = triton.cdiv(W, cfg.tw)
    tiles_per_img = triton.cdiv(H, cfg.th) * tiles_w
    return tiles_w, tiles_per_img, (N * tiles_per_img, triton.cdiv(C, cfg.block_c))


def _sum_rows(src: torch.Tensor) -> torch.Tensor:
    """Sum a float32 [R, ...] tensor over its first dimension in index order -> float32 [...]."""
    src = src.contiguous()
    R = src.shape[0]
    L = src[0].numel()
    out = empty(src.shape[1:], dtype=torch.float32, device=src.device)
    BLOCK = 64 if _interpreting(src.device) else 512
    _sum_rows_kernel[(triton.cdiv(L, BLOCK),)](src, out, R, L, BLOCK=BLOCK)
    return out


def _conv_launch(x, wt, bias, y, a, scale, shift, kernel, pads, act, train, store_a, cfg, int64):
    """One launch of ``_conv_kernel``; returns the partials [3, T, C] (training) or None."""
    N, C, H, W = x.shape
    tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
    T = grid[0]
    part = empty((3, T, C), dtype=torch.float32, device=x.device) if train else None
    dummy = wt
    _conv_kernel[grid](
        x, wt, bias if bias is not None else dummy, a if store_a else dummy, y,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        part if part is not None else dummy,
        C, H, W, T, tiles_w, tiles_per_img, *_strides(x), *_strides(y),
        KH=kernel[0], KW=kernel[1], PT=pads[0], PL=pads[1], ACT=act, HAS_BIAS=bias is not None,
        TRAIN=train, STORE_A=store_a, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64,
        num_warps=cfg.num_warps)
    return part


def _layout_key(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))


def depthwise_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats: bool,
                      momentum: float, eps: float, act: int, pads: Tuple[int, int], store_a: bool):
    """The forward launches: returns (y, a, stats [2, C] = (mean, rstd)). Running buffers, when given
    and ``use_batch_stats``, are updated in place by the finalize step."""
    N, C, H, W = x.shape
    kernel = tuple(weight.shape[-2:])
    y = empty_like(x)
    a = empty_like(y) if store_a else x.new_empty(0)
    call = BatchNormCall(bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps)
    if x.numel() == 0:  # empty batch: nothing to normalize, running statistics left alone
        return y, a, torch.zeros(2, C, dtype=torch.float32, device=x.device)
    wt = _weight_taps(weight)
    int64 = _needs_int64(x, y)
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    cands = _candidates(H, W, C, channels_last, x.device)
    key = _layout_key(x) + (kernel, act)
    if use_batch_stats:
        def bench(cfg):
            _conv_launch(x, wt, bias, empty_like(y), empty_like(y), None, None, kernel, pads, act, True, True,
                         cfg, int64)

        cfg = _pick_config("forward_train", key, cands, bench)
        part = _conv_launch(x, wt, bias, y, a, None, None, kernel, pads, act, True, True, cfg, int64)
        mean, rstd, scale, shift = finalize(part, call)
        cfg = _default_config(H, W, C, channels_last, x.device)
        tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
        _apply_kernel[grid](x, a, y, scale, shift, C, H, W, tiles_w, tiles_per_img, *_strides(x), *_strides(y),
                            ACT=act, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64,
                            num_warps=cfg.num_warps)
    else:
        mean, rstd, scale, shift = eval_stats(call)

        def bench(cfg):
            _conv_launch(x, wt, bias, empty_like(y), empty_like(y), scale, shift, kernel, pads, act, False,
                         store_a, cfg, int64)

        cfg = _pick_config("forward_eval", key + (store_a,), cands, bench)
        _conv_launch(x, wt, bias, y, a, scale, shift, kernel, pads, act, False, store_a, cfg, int64)
    return y, a, torch.stack((mean, rstd))


def _persistent_programs(n_items: int, channel_blocks: int, device) -> int:
    """Programs per channel block for the persistent backward kernel: enough to fill the GPU a few
    times over, few enough that the scratch slots stay cache-resident."""
    if _interpreting(device):
        return max(1, min(n_items, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_items, triton.cdiv(4 * sms, channel_blocks)))


def depthwise_backward(dy, x, a, weight, bn_weight, stats, use_batch_stats: bool, act: int,
                       pads: Tuple[int, int], need_dx: bool, need_dw: bool, need_db: bool, need_dbn: bool):
    """The backward launches: returns float32-accumulated (dx, dw, db, dgamma, dbeta) in the dtypes of
    x, weight, weight, float32, float32; a gradient not asked for is an empty tensor."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[-2:]
    dev = x.device
    M = N * H * W
    f32 = dict(dtype=torch.float32, device=dev)
    dx = empty_like(x) if need_dx else x.new_empty(0)
    if M == 0:
        return (dx, torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_dw else x.new_empty(0),
                torch.zeros(C, dtype=weight.dtype, device=dev) if need_db else x.new_empty(0),
                torch.zeros(C, **f32), torch.zeros(C, **f32))
    mean, rstd = stats[0].contiguous(), stats[1].contiguous()
    int64 = _needs_int64(x, a, dy) or (need_dx and _needs_int64(dx))
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    # 1. sum(dy) and sum(dy * xhat) per channel (the batch-statistics terms, and dgamma, dbeta)
    sums = None
    if use_batch_stats or need_dbn:
        cfg = _default_config(H, W, C, channels_last, dev)
        tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
        part = empty((grid[0], 2, C), **f32)
        _reduce_kernel[grid](dy, a, mean, rstd, part, C, H, W, tiles_w, tiles_per_img, *_strides(dy), *_strides(a),
                             ACT=act, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64,
                             num_warps=cfg.num_warps)
        sums = _sum_rows(part)  # [2, C]
    dgamma = sums[1].clone() if need_dbn else torch.zeros(C, **f32)  # clones: outputs may not alias
    dbeta = sums[0].clone() if need_dbn else torch.zeros(C, **f32)
    if not (need_dx or need_dw or need_db):
        return dx, x.new_empty(0), x.new_empty(0), dgamma, dbeta
    # 2. da = act'(a) * (k1*dy + k2*(act(a) - mean) + k3), BatchNorm's backward folded per channel
    scale = rstd if bn_weight is None else bn_weight.float() * rstd
    if use_batch_stats:
        coef = torch.stack((scale, -scale * rstd * (sums[1] / M), -scale * (sums[0] / M), mean))
    else:
        zero = torch.zeros_like(scale)
        coef = torch.stack((scale, zero, zero, mean))
    wt = _weight_taps(weight)
    key = _layout_key(x) + ((KH, KW), act, use_batch_stats, need_dx, need_dw or need_db)
    cands = _candidates(H, W, C, channels_last, dev)

    def launch(cfg, dx_out):
        tiles_w, tiles_per_img, grid = _grid(cfg, N, H, W, C)
        n_items, cblocks = grid
        P = _persistent_programs(n_items, cblocks, dev)
        region = (cfg.th + KH - 1) * (cfg.tw + KW - 1)
        scratch = empty((P * cblocks, region, cfg.block_c), **f32)
        dwp = torch.zeros((P, KH * KW, C), **f32)
        dbp = torch.zeros((P, C), **f32)
        _input_grad_kernel[(P, cblocks)](
            dy, a, x, wt, coef, dx_out if need_dx else dy, scratch, dwp, dbp,
            C, H, W, n_items, tiles_w, tiles_per_img, *_strides(dy), *_strides(a), *_strides(x),
            KH=KH, KW=KW, PT=pads[0], PL=pads[1], ACT=act, TRAIN=use_batch_stats, NEED_DX=need_dx,
            NEED_DW=need_dw or need_db, TH=cfg.th, TW=cfg.tw, BLOCK_C=cfg.block_c, INT64=int64,
            num_warps=cfg.num_warps)
        return dwp, dbp

    cfg = _pick_config("backward", key, cands, lambda c: launch(c, empty_like(dx) if need_dx else None))
    dwp, dbp = launch(cfg, dx)
    dw, db = x.new_empty(0), x.new_empty(0)
    if need_dw:
        dw = _sum_rows(dwp).t().contiguous().view(weight.shape).to(weight.dtype)
    if need_db:
        db = _sum_rows(dbp).to(weight.dtype)
    return dx, dw, db, dgamma, dbeta


# ====================================================================== torch.library ops + autograd
# Two functional custom ops (a custom op with an autograd formula may not mutate its inputs):
# the forward returns the new running statistics, which ``depthwise_block_triton`` copies into
# the buffers; the backward op is what the autograd formula calls, so torch.compile traces both
# as opaque nodes (no graph breaks) and the kernels run as they do in eager mode.


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("convmixer_kernels::depthwise_block_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
            bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
            running_var: Optional[torch.Tensor], use_batch_stats: bool, momentum: float, eps: float, act: int,
            pad_top: int, pad_left: int, store_a: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, a, stats [2, C] (mean, rstd), new running_mean, new running_var); the last two are
    empty unless running statistics are updated, ``a`` is empty unless kept."""
    update = use_batch_stats and running_mean is not None
    rm = running_mean.clone() if update else None
    rv = running_var.clone() if update else None
    with _on_device(x):
        y, a, stats = depthwise_forward(x, weight, bias, bn_weight, bn_bias,
                                        rm if use_batch_stats else running_mean,
                                        rv if use_batch_stats else running_var, use_batch_stats, momentum, eps, act,
                                        (pad_top, pad_left), store_a or use_batch_stats)
    if not update:
        rm, rv = x.new_empty(0), x.new_empty(0)
    return y, a, stats, rm, rv


@_fwd_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps, act,
      pad_top, pad_left, store_a):
    C = x.shape[1]
    update = use_batch_stats and running_mean is not None
    y = torch.empty_like(x)
    a = torch.empty_like(y) if (store_a or use_batch_stats) else x.new_empty(0)
    rm = running_mean.new_empty(running_mean.shape) if update else x.new_empty(0)
    rv = running_var.new_empty(running_var.shape) if update else x.new_empty(0)
    return y, a, x.new_empty((2, C), dtype=torch.float32), rm, rv


@torch.library.custom_op("convmixer_kernels::depthwise_block_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
            bn_weight: Optional[torch.Tensor], stats: torch.Tensor, use_batch_stats: bool, act: int, pad_top: int,
            pad_left: int, need_dx: bool, need_dw: bool, need_db: bool, need_dbn: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dw, db, dgamma, dbeta); gradients not asked for are empty."""
    with _on_device(x):
        return depthwise_backward(dy, x, a, weight, bn_weight, stats, use_batch_stats, act, (pad_top, pad_left),
                                  need_dx, need_dw, need_db, need_dbn)


@_bwd_op.register_fake
def _(dy, x, a, weight, bn_weight, stats, use_batch_stats, act, pad_top, pad_left, need_dx, need_dw, need_db,
      need_dbn):
    C = x.shape[1]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else x.new_empty(0),
            weight.new_empty((C,)) if need_db else x.new_empty(0),
            x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, _, _, use_batch_stats, _, _, act, pad_top, pad_left, _ = inputs
    _, a, stats, _, _ = output
    # x and a are the only activation-sized tensors kept (design.md section 4)
    ctx.save_for_backward(x, a, weight, bn_weight, stats)
    ctx.config = (use_batch_stats, act, pad_top, pad_left)
    ctx.has_bias = bias is not None
    ctx.bn_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)


def _backward(ctx, dy, _da, _dstats, _drm, _drv):
    x, a, weight, bn_weight, stats = ctx.saved_tensors
    use_batch_stats, act, pad_top, pad_left = ctx.config
    need = ctx.needs_input_grad
    need_dbn = need[3] or need[4]
    dx, dw, db, dgamma, dbeta = torch.ops.convmixer_kernels.depthwise_block_bwd(
        dy, x, a, weight, bn_weight, stats, use_batch_stats, act, pad_top, pad_left,
        need[0], need[1], need[2] and ctx.has_bias, need_dbn)
    gamma_dtype, beta_dtype = ctx.bn_dtypes
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] and ctx.has_bias else None,
            dgamma.to(gamma_dtype) if need[3] else None, dbeta.to(beta_dtype) if need[4] else None,
            None, None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_block_triton(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                           use_batch_stats: bool, momentum: float, eps: float, *,
                           activation: str, padding: Padding) -> torch.Tensor:
    """The Triton backend, with the reference's signature and semantics."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_block (triton): expected x [N, C, H, W] and weight [C, 1, kh, kw], "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    pad_top, pad_left = same_padding(padding, tuple(weight.shape[-2:]))
    tensors = (x, weight, bias, bn_weight, bn_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _, _, new_mean, new_var = torch.ops.convmixer_kernels.depthwise_block_fwd(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, float(momentum),
        float(eps), ACT_CODE[activation], pad_top, pad_left, needs_grad)
    if use_batch_stats and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


def _triton_unsupported(x, weight, bn, compute_dtype, activation, padding, **config) -> Optional[str]:
    reason = common_unsupported(x=x, weight=weight, bn=bn, compute_dtype=compute_dtype, activation=activation,
                                residual=True, **config)
    if reason:
        return reason
    if activation not in ACT_CODE:
        return f"activation {activation!r} has no Triton kernel"
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        return f"input {tuple(x.shape)} with weight {tuple(weight.shape)} is not a depthwise conv"
    if x.shape[1] == 0:
        return "the input has no channels"
    try:
        same_padding(padding, tuple(weight.shape[-2:]))
    except ValueError as e:
        return str(e)
    for name, t in (("BatchNorm weight", bn.weight), ("BatchNorm bias", bn.bias),
                    ("running_mean", bn.running_mean), ("running_var", bn.running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[1] or not t.is_floating_point()):
            return f"{name} of shape {tuple(t.shape)} and dtype {t.dtype} does not fit {x.shape[1]} channels"
    return None


# ====================================================================== reference and front function


def same_padding(padding: Padding, kernel_size: Tuple[int, int]) -> Tuple[int, int]:
    """(top, left) zero padding of a stride-1 conv whose output has the input's size.

    ``padding="same"`` pads (k-1)//2 on the top/left
    and the rest on the bottom/right, so an even k pads more at the bottom/right.
    An explicit symmetric padding p is "same" only when 2p == k-1.
    """
    kh, kw = kernel_size
    if padding == "same":
        return (kh - 1) // 2, (kw - 1) // 2
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r} does not keep the feature map's size")
    ph, pw = padding
    if 2 * ph != kh - 1 or 2 * pw != kw - 1:
        raise ValueError(f"padding={tuple(padding)} with kernel {kernel_size} does not keep the feature map's size")
    return ph, pw


def depthwise_block_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              use_batch_stats: bool, momentum: float, eps: float, *,
                              activation: str, padding: Padding) -> torch.Tensor:
    """The unfused composition, op for op as the reference module runs it."""
    a = F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])
    g = activation_reference(a, activation)
    z = F.batch_norm(g, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum, eps)
    return z + x


def depthwise_block(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn: BatchNormCall, *,
                    activation: str, padding: Padding, backend: str = "auto") -> Tuple[torch.Tensor, str]:
    """y = x + BN(act(dwconv(x) + b)) on the chosen backend; returns (y, backend that ran)."""
    return run_block(OP, depthwise_block_reference, x, weight, bias, bn, backend,
                     activation=activation, padding=padding)


backends.register_op(OP, "torch", f"{__name__}:depthwise_block_reference")
backends.register_op(OP, "triton", f"{__name__}:depthwise_block_triton", _triton_unsupported)


def _cuda_unsupported(**config) -> Optional[str]:
    # imported on first use: that module registers its torch.library ops and loads the extension
    from .depthwise_block_cuda import unsupported

    return unsupported(**config)


backends.register_op(OP, "cuda", "convmixer_kernels.ops.depthwise_block_cuda:depthwise_block_cuda", _cuda_unsupported)
