"""Pointwise block: z = BN(act(W r + b)), a 1x1 conv as a GEMM, design.md section 3.2.

This file holds the op's reference (``pointwise_block_reference``), its front
function (``pointwise_block``), the Triton backend and the backend registrations.
Every backend's implementation takes the reference's exact signature.

Triton backend (``pointwise_block_triton``), in the [M = N*H*W, C] view of the activations:

* forward, training: one GEMM ``p = r W^T + b`` whose epilogue stores p and the per-tile
  BatchNorm statistics of act(p) (the [3, T, C] partials of ``batchnorm.py``); the shared
  ``finalize``; ``_apply_kernel`` writes ``z = act(p) * s + t``.
* forward, eval without grad: one GEMM whose epilogue writes z directly (read r, write z).
* backward: ``_bn_bwd_kernel`` twice over (dz, p) - the reduction pass (sum dz, sum dz*xhat),
  then the pass that materializes ``dp = BN_bwd(dz) * act'(p)`` once with per-tile sums of dp
  (db) - then two GEMMs with the same kernel: ``dr = dp W`` and ``dW = dp^T r`` (split-K with a
  fixed-order reduction when the output has too few tiles to fill the GPU).

All reductions add tiles in index order (no atomics), so results are bitwise reproducible.
The alternative backward (dp recomputed in the GEMM prologues from dz and p instead of stored)
is not built: it saves one write and one read of dp but recomputes act' twice; to be measured
on the GPU.

The GEMM reads every operand through strides, so NCHW, channels_last and strided views are read
in place (no copies): the pixel index m of an [N, C, H, W] tensor is decomposed into (n, h, w)
with the fewest dims its strides allow (``_Axis``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from .activation import ACT_CODE, activation_reference
from .batchnorm import BatchNormCall, eval_stats, finalize
from .dispatch import common_unsupported, run_block
from .tuning import autotune_enabled

OP = "pointwise_block"

try:  # the torch backend must work without triton
    import triton
    import triton.language as tl

    from .activation_triton import act_fwd, act_grad
    from .alloc import empty
    from .batchnorm_triton import tile_stats

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAVE_TRITON = False


# ====================================================================== Triton kernels

if HAVE_TRITON:

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
            pro_scale_ptr, pro_shift_ptr, res_ptr,  # A-side prologue inputs (design.md 3.3)
            I, J, K, k_per_split, part_plane,  # part_plane = T * J, one plane of the partials
            a_d1, a_d2, a_s0, a_s1, a_s2, stride_ak,  # A[i, k] at offsets(i) + k * stride_ak
            b_d1, b_d2, b_s0, b_s1, b_s2, stride_bj,  # B[k, j] at offsets(k) + j * stride_bj
            c_d1, c_d2, c_s0, c_s1, c_s2, stride_cj, stride_csplit,  # C[i, j] (+ split * stride_csplit)
            A_DIMS: tl.constexpr, B_DIMS: tl.constexpr, C_DIMS: tl.constexpr,
            PRO_ACT: tl.constexpr, PRO_AFFINE: tl.constexpr, HAS_RES: tl.constexpr,
            HAS_BIAS: tl.constexpr, STATS: tl.constexpr, APPLY: tl.constexpr, ACT: tl.constexpr,
            DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr):
        """C = A' B (+ epilogue), fp32 accumulation; A' = A, or the prologue's act(A)*s[k]+t[k] (+ res).

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
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            mask_k = kk < k_hi
            mask_a = mask_i[:, None] & mask_k[None, :]
            a_off = a_rows[:, None] + kk.to(tl.int64)[None, :] * stride_ak
            a = tl.load(a_ptr + a_off, mask=mask_a, other=0.0)
            if PRO_ACT >= 0 or PRO_AFFINE or HAS_RES:
                g = a.to(tl.float32)
                if PRO_ACT >= 0:
                    g = act_fwd(g, PRO_ACT)
                if PRO_AFFINE:
                    s = tl.load(pro_scale_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
                    t = tl.load(pro_shift_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
                    g = g * s[None, :] + t[None, :]
                if HAS_RES:  # the residual shares A's layout
                    g += tl.load(res_ptr + a_off, mask=mask_a, other=0.0).to(tl.float32)
                a = tl.where(mask_a, g, 0.0).to(a_ptr.dtype.element_ty)  # padding lanes must stay 0
            b_rows = _offsets(kk, b_d1, b_d2, b_s0, b_s1, b_s2, B_DIMS)
            b = tl.load(b_ptr + b_rows[:, None] + b_cols[None, :], mask=mask_k[:, None] & mask_j[None, :],
                        other=0.0)
            if DOT_F32:  # the interpreter's bf16 dot is wrong (gpu.md); bf16 products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        mask = mask_i[:, None] & mask_j[None, :]
        out_ty = c_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rj, mask=mask_j, other=0.0).to(tl.float32)[None, :]
        if STATS or APPLY:
            acc = acc.to(out_ty).to(tl.float32)  # exactly the p a later pass reads back
        if STATS:
            count, mean, m2 = tile_stats(act_fwd(acc, ACT), mask, 0)
            pofs = pid_i.to(tl.int64) * J + rj
            tl.store(part_ptr + pofs, count, mask=mask_j)
            tl.store(part_ptr + part_plane + pofs, mean, mask=mask_j)
            tl.store(part_ptr + 2 * part_plane + pofs, m2, mask=mask_j)
        if APPLY:
            s = tl.load(scale_ptr + rj, mask=mask_j, other=0.0)
            t = tl.load(shift_ptr + rj, mask=mask_j, other=0.0)
            acc = act_fwd(acc, ACT) * s[None, :] + t[None, :]
        c_rows = _offsets(ri, c_d1, c_d2, c_s0, c_s1, c_s2, C_DIMS)
        c_off = split.to(tl.int64) * stride_csplit + c_rows[:, None] + rj.to(tl.int64)[None, :] * stride_cj
        tl.store(c_ptr + c_off, acc.to(out_ty), mask=mask)

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
    def _bn_bwd_kernel(dz_ptr, p_ptr, dp_ptr, part_ptr, mean_ptr, rstd_ptr, scale_ptr, sums_ptr,
                       M, C, tiles_per_prog, inv_m,
                       dz_d1, dz_d2, dz_s0, dz_s1, dz_s2, stride_dzc, DZ_DIMS: tl.constexpr,
                       ACT: tl.constexpr, TRAIN: tl.constexpr, STORE_DP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """One pass over (dz, p) for ``tiles_per_prog`` row tiles per program; xhat = (act(p) - mean) * rstd.

        STORE_DP False (reduction pass): partials [2, T, C] = (sum dz, sum dz * xhat) per program.
        STORE_DP True: dp = dg * act'(p) with dg = scale * (dz - sums[0]/M - xhat * sums[1]/M) in
        training (batch statistics) or dg = scale * dz in eval; stores dp (row-major [M, C]) and
        partials [1, T, C] = sum dp (for db).
        """
        pid_m = tl.program_id(0)
        T = tl.num_programs(0)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = rc < C
        mean = tl.load(mean_ptr + rc, mask=mask_c, other=0.0)
        rstd = tl.load(rstd_ptr + rc, mask=mask_c, other=0.0)
        if STORE_DP:
            scale = tl.load(scale_ptr + rc, mask=mask_c, other=0.0)
            if TRAIN:
                mean_dz = tl.load(sums_ptr + rc, mask=mask_c, other=0.0) * inv_m
                mean_dzx = tl.load(sums_ptr + C + rc, mask=mask_c, other=0.0) * inv_m
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
            xhat = (act_fwd(p, ACT) - mean[None, :]) * rstd[None, :]
            if STORE_DP:
                if TRAIN:
                    dg = scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])
                else:
                    dg = scale[None, :] * dz
                dp = dg * act_grad(p, ACT)
                tl.store(dp_ptr + p_off, dp.to(dp_ptr.dtype.element_ty), mask=mask)
                acc0 += tl.where(mask, dp, 0.0)
            else:
                acc0 += tl.where(mask, dz, 0.0)
                acc1 += tl.where(mask, dz * xhat, 0.0)
        plane = T.to(tl.int64) * C
        pofs = pid_m.to(tl.int64) * C + rc
        tl.store(part_ptr + pofs, tl.sum(acc0, axis=0), mask=mask_c)
        if not STORE_DP:
            tl.store(part_ptr + plane + pofs, tl.sum(acc1, axis=0), mask=mask_c)

    @triton.jit
    def _sum_tiles_kernel(part_ptr, out_ptr, T, L, BLOCK: tl.constexpr):
        """out[r, l] = sum over t of part[r, t, l], added in index order (deterministic)."""
        r = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < L
        ptrs = part_ptr + r * T * L + cols
        acc = tl.load(ptrs, mask=mask, other=0.0)
        for _ in range(1, T):
            ptrs += L  # pointer steps: t * L may not fit in 32 bits
            acc += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(out_ptr + r * L + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


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


def _output_like(x: Tensor, channels: int, dtype=None) -> Tensor:
    """An [N, channels, H, W] output in x's memory format (design.md 5.12): channels_last for a
    channels_last x, else contiguous NCHW."""
    n, _, h, w = x.shape
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    return empty((n, channels, h, w), dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


@dataclass(frozen=True)
class GemmConfig:
    block_i: int
    block_j: int
    block_k: int
    group_i: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def meta(self):
        return dict(BLOCK_I=self.block_i, BLOCK_J=self.block_j, BLOCK_K=self.block_k, GROUP_I=self.group_i,
                    num_warps=self.num_warps, num_stages=self.num_stages)


# Candidates tried on CUDA, sized for Hopper's 228 KB of shared memory; those that do not fit a
# smaller GPU (or float32 operands) fail to compile and are skipped.
GEMM_CONFIGS = [
    GemmConfig(128, 128, 64, 8, 8, 3),
    GemmConfig(128, 256, 64, 8, 8, 3),
    GemmConfig(256, 128, 64, 8, 8, 3),
    GemmConfig(128, 128, 64, 8, 4, 4),
    GemmConfig(128, 64, 64, 8, 4, 4),
    GemmConfig(64, 128, 64, 8, 4, 4),
    GemmConfig(64, 64, 64, 8, 4, 4),
    GemmConfig(128, 128, 32, 8, 4, 4),
    GemmConfig(64, 64, 32, 8, 4, 3),
]
# The interpreter: small tiles (dot needs >= 16), a group of 2 so the grouped ordering is exercised.
INTERPRETER_CONFIG = GemmConfig(16, 16, 16, 2, 4, 1)

_tuned: Dict[tuple, GemmConfig] = {}


def _interpreting() -> bool:
    return backends.triton_interpreting()


def _pick_config(key: tuple, I: int, J: int, default: GemmConfig,
                 launch: Callable[[GemmConfig], None]) -> GemmConfig:
    """The GEMM configuration for ``key`` (shapes, dtypes, layouts, epilogue): benchmarked once per
    key on CUDA and cached; fixed under the interpreter, in deterministic mode or with autotuning off."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if not autotune_enabled():
        return default
    if key in _tuned:
        return _tuned[key]
    cap_i, cap_j = max(64, triton.next_power_of_2(I)), max(64, triton.next_power_of_2(J))
    best, best_ms = default, float("inf")
    for cfg in [default] + GEMM_CONFIGS:
        if cfg.block_i > cap_i or cfg.block_j > cap_j:
            continue
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=25)
        except Exception:  # out of shared memory / registers on this GPU: not a candidate here
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _tuned[key] = best
    return best


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
    """Launch ``_gemm_kernel``: C[i, j] = sum_k A'[i, k] B[k, j] (+ epilogue); returns the partials if ``stats``.

    Layouts are given per axis (``_Axis`` for the axes that may be pixel indices, a plain stride for
    the others). ``prologue`` = dict(act=code or -1, scale=, shift=, residual=) applies
    A' = act(A) * scale[k] + shift[k] + residual[i, k] on load (residual in A's layout). With
    ``split_k`` > 1 program axis 1 splits K and split s writes C + s * stride_csplit.
    """
    if a.dtype != b.dtype:
        raise RuntimeError(f"gemm: operand dtypes differ ({a.dtype} and {b.dtype})")
    pro = prologue or {}
    dummy = c
    interp = _interpreting()
    precision = "ieee" if interp else _dot_precision(a.dtype, a.device)
    dot_f32 = interp and a.dtype == torch.bfloat16
    k_per_split, split_k = split_plan(K, split_k)
    holder = {}

    def launch(cfg: GemmConfig):
        part = None
        if stats:
            part = empty((3, triton.cdiv(I, cfg.block_i), J), dtype=torch.float32, device=c.device)
        grid = (triton.cdiv(I, cfg.block_i) * triton.cdiv(J, cfg.block_j), split_k)
        _gemm_kernel[grid](
            a, b, c,
            bias if bias is not None else dummy,
            apply[0] if apply else dummy, apply[1] if apply else dummy,
            part if part is not None else dummy,
            pro.get("scale", dummy) if pro.get("scale") is not None else dummy,
            pro.get("shift", dummy) if pro.get("shift") is not None else dummy,
            pro.get("residual") if pro.get("residual") is not None else dummy,
            I, J, K, k_per_split, triton.cdiv(I, cfg.block_i) * J,
            *a_rows.args(), stride_ak, *b_k.args(), stride_bj, *c_rows.args(), stride_cj, stride_csplit,
            A_DIMS=a_rows.dims, B_DIMS=b_k.dims, C_DIMS=c_rows.dims,
            PRO_ACT=pro.get("act", -1), PRO_AFFINE=pro.get("scale") is not None,
            HAS_RES=pro.get("residual") is not None,
            HAS_BIAS=bias is not None, STATS=stats, APPLY=apply is not None, ACT=act,
            DOT_F32=dot_f32, PRECISION=precision, **cfg.meta())
        holder["part"] = part

    if config is None:
        key = (I, J, K, a.dtype, c.dtype, a_rows.dims, b_k.dims, c_rows.dims, stride_ak == 1, stride_bj == 1,
               stride_cj == 1, bias is not None, stats, apply is not None, act, tuple(sorted(pro)), split_k,
               precision, a.device.index)
        # the default keeps 3 stages of 32 KB tiles in shared memory (fits any GPU since Ampere)
        default = GemmConfig(128, 128, 32 if a.dtype == torch.float32 else 64, 8, 8, 3)
        config = _pick_config(key, I, J, default, launch)
    launch(config)
    return holder["part"]


def split_plan(K: int, split_k: int) -> Tuple[int, int]:
    """(K per split, number of splits) for about ``split_k`` splits; each split is a multiple of 64
    (of every BLOCK_K), so only the last one is ragged."""
    if split_k <= 1:
        return K, 1
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), 64) * 64
    return k_per_split, triton.cdiv(K, k_per_split)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _rowwise_config(M: int, C: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, programs along M, row tiles per program) for the row-wise passes: enough
    programs to fill the GPU, few enough that the [T, C] partials stay small."""
    if _interpreting():
        block_m, block_c, tiles_per_prog = 8, 16, 2  # > 1 tile per program exercises the loop
        return block_m, block_c, triton.cdiv(M, block_m * tiles_per_prog), tiles_per_prog
    block_m, block_c = 32, min(128, triton.next_power_of_2(max(C, 16)))
    row_tiles = triton.cdiv(M, block_m)
    progs = max(1, min(row_tiles, 8 * _num_sms(device) // triton.cdiv(C, block_c)))
    tiles_per_prog = triton.cdiv(row_tiles, progs)
    return block_m, block_c, triton.cdiv(row_tiles, tiles_per_prog), tiles_per_prog


def sum_tiles(part: Tensor, dtype=torch.float32) -> Tensor:
    """[R, T, L] -> [R, L], tiles added in index order."""
    R, T, L = part.shape
    out = empty((R, L), dtype=dtype, device=part.device)
    BLOCK = 16 if _interpreting() else 1024
    _sum_tiles_kernel[(triton.cdiv(L, BLOCK), R)](part, out, T, L, BLOCK=BLOCK)
    return out


def _conv_weight(weight: Tensor) -> Tuple[int, int, int, int]:
    """(Cout, Cin, stride over Cout, stride over Cin) of a [Cout, Cin, 1, 1] conv weight."""
    return weight.shape[0], weight.shape[1], weight.stride(0), weight.stride(1)


def pointwise_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], call: BatchNormCall, activation: str,
                      save_for_backward: bool) -> Tuple[Tensor, ...]:
    """The forward; returns (z, p, mean, rstd, scale). p is [M, Cout] row-major when saved, else empty.

    Running buffers are updated in place by ``finalize`` (through ``call``), when it has them.
    """
    N, _, H, W = x.shape
    cout, cin, s_wo, s_wi = _conv_weight(weight)
    M = N * H * W
    act = ACT_CODE[activation]
    z = _output_like(x, cout)
    no_p = empty((0,), dtype=x.dtype, device=x.device)
    if M == 0:  # empty batch: no statistics, running buffers untouched (as F.batch_norm)
        stats = [torch.zeros(cout, dtype=torch.float32, device=x.device) for _ in range(3)]
        p = empty((0, cout), dtype=x.dtype, device=x.device) if save_for_backward else no_p
        return (z, p, *stats)
    x_rows = _pixels(x)
    w_k = _linear(s_wi)  # B[k = cin, j = cout] = weight[cout, cin]
    if not call.use_batch_stats and not save_for_backward:  # eval, inference: one kernel, r -> z
        mean, rstd, scale, shift = (t.clone() for t in eval_stats(call))
        gemm(x, x_rows, x.stride(1), weight, w_k, s_wo, z, _pixels(z), z.stride(1), M, cout, cin,
             bias=bias, apply=(scale, shift), act=act)
        return z, no_p, mean, rstd, scale
    p = empty((M, cout), dtype=x.dtype, device=x.device)
    part = gemm(x, x_rows, x.stride(1), weight, w_k, s_wo, p, _linear(cout), 1, M, cout, cin,
                bias=bias, stats=call.use_batch_stats, act=act)
    if call.use_batch_stats:
        mean, rstd, scale, shift = finalize(part, call)
    else:
        mean, rstd, scale, shift = (t.clone() for t in eval_stats(call))
    block_m, block_c = (8, 16) if _interpreting() else (64, min(128, triton.next_power_of_2(max(cout, 16))))
    _apply_kernel[(triton.cdiv(M, block_m), triton.cdiv(cout, block_c))](
        p, z, scale, shift, M, cout, *_pixels(z).args(), z.stride(1), Z_DIMS=_pixels(z).dims,
        ACT=act, BLOCK_M=block_m, BLOCK_C=block_c)
    return z, (p if save_for_backward else no_p), mean, rstd, scale


def _split_k(tiles: int, K: int, device: torch.device) -> int:
    """How many K splits the weight-gradient GEMM needs to fill the GPU (K = M is long, the output small)."""
    if _interpreting():
        return 2 if K > 64 else 1  # exercised by the tests
    want = triton.cdiv(2 * _num_sms(device), max(tiles, 1))
    return max(1, min(want, K // 1024))


def pointwise_backward(dz: Tensor, x: Tensor, weight: Tensor, p: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                       use_batch_stats: bool, activation: str, need_x: bool, need_w: bool, need_b: bool,
                       need_bn: bool) -> Tuple[Tensor, ...]:
    """(dx, dW, db, dgamma, dbeta); each is an empty tensor when not needed. dgamma/dbeta are float32."""
    N, _, H, W = x.shape
    cout, cin, s_wo, s_wi = _conv_weight(weight)
    M = N * H * W
    dev = x.device

    def none():  # a fresh placeholder each time: custom-op outputs may not alias each other
        return empty((0,), dtype=torch.float32, device=dev)

    dx = _output_like(x, cin) if need_x else empty((0,), dtype=x.dtype, device=dev)
    if M == 0:
        if need_x:
            dx.zero_()
        zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        return (dx, zeros(weight.shape, weight.dtype) if need_w else none(),
                zeros((cout,), x.dtype) if need_b else none(),
                zeros((cout,), torch.float32) if need_bn else none(),
                zeros((cout,), torch.float32) if need_bn else none())
    act = ACT_CODE[activation]
    dz_rows = _pixels(dz)
    block_m, block_c, progs, tiles_per_prog = _rowwise_config(M, cout, dev)
    grid = (progs, triton.cdiv(cout, block_c))
    common = dict(DZ_DIMS=dz_rows.dims, ACT=act, TRAIN=use_batch_stats, BLOCK_M=block_m, BLOCK_C=block_c)
    sums = none()
    if use_batch_stats or need_bn:  # the reduction pass: sum dz, sum dz * xhat
        part = empty((2, progs, cout), dtype=torch.float32, device=dev)
        _bn_bwd_kernel[grid](dz, p, p, part, mean, rstd, scale, sums, M, cout, tiles_per_prog, 1.0 / M,
                             *dz_rows.args(), dz.stride(1), STORE_DP=False, **common)
        sums = sum_tiles(part)
    dp = empty((M, cout), dtype=x.dtype, device=dev)
    part_db = empty((1, progs, cout), dtype=torch.float32, device=dev)
    _bn_bwd_kernel[grid](dz, p, dp, part_db, mean, rstd, scale, sums, M, cout, tiles_per_prog, 1.0 / M,
                         *dz_rows.args(), dz.stride(1), STORE_DP=True, **common)
    db = sum_tiles(part_db, dtype=x.dtype).view(cout) if need_b else none()
    if need_x:  # dr[m, cin] = sum_cout dp[m, cout] weight[cout, cin]
        gemm(dp, _linear(cout), 1, weight, _linear(s_wo), s_wi, dx, _pixels(dx), dx.stride(1), M, cin, cout)
    dw = none()
    if need_w:  # dW[cout, cin] = sum_m dp[m, cout] x[m, cin]: K = M, split when the output is small
        tiles_hint = triton.cdiv(cout, 128) * triton.cdiv(cin, 128)
        split = _split_k(tiles_hint, M, dev)
        if split == 1:
            dw = empty((cout, cin), dtype=weight.dtype, device=dev)
            gemm(dp, _linear(1), cout, x, _pixels(x), x.stride(1), dw, _linear(cin), 1, cout, cin, M)
        else:
            _, split = split_plan(M, split)
            part_w = empty((split, cout, cin), dtype=torch.float32, device=dev)
            gemm(dp, _linear(1), cout, x, _pixels(x), x.stride(1), part_w, _linear(cin), 1, cout, cin, M,
                 split_k=split, stride_csplit=cout * cin)
            dw = sum_tiles(part_w.view(1, split, cout * cin), dtype=weight.dtype)
        dw = dw.view(weight.shape)
    dgamma, dbeta = (sums[1].clone(), sums[0].clone()) if need_bn else (none(), none())
    return dx, dw, db, dgamma, dbeta


# ====================================================================== torch.library ops and autograd
# Functional ops (torch.library cannot attach autograd to a mutating op): the forward returns
# the updated running buffers, finalize having updated fresh copies, and the caller copies them
# back. torch.compile(fullgraph=True) traces through both ops.

if HAVE_TRITON:

    @torch.library.custom_op("convmixer_kernels::pointwise_block_fwd", mutates_args=())
    def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                use_batch_stats: bool, momentum: float, eps: float, activation: str,
                save_for_backward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(z, p, mean, rstd, scale, new running_mean, new running_var); the last two are empty when
        the running buffers are not updated."""
        update = use_batch_stats and running_mean is not None and x.numel() > 0
        new_rm = running_mean.clone() if update else empty((0,), dtype=torch.float32, device=x.device)
        new_rv = running_var.clone() if update else empty((0,), dtype=torch.float32, device=x.device)
        call = BatchNormCall(bn_weight, bn_bias, new_rm if update else running_mean,
                             new_rv if update else running_var, use_batch_stats, momentum, eps)
        out = pointwise_forward(x, weight, bias, call, activation, save_for_backward)
        return (*out, new_rm, new_rv)

    @_fwd_op.register_fake
    def _fwd_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps,
                  activation, save_for_backward):
        N, _, H, W = x.shape
        cout = weight.shape[0]
        fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                      and not x.is_contiguous()) else torch.contiguous_format
        z = x.new_empty((N, cout, H, W)).contiguous(memory_format=fmt)
        p = x.new_empty((N * H * W, cout) if save_for_backward else (0,))
        stats = [x.new_empty((cout,), dtype=torch.float32) for _ in range(3)]
        update = use_batch_stats and running_mean is not None and x.numel() > 0
        rm = torch.empty_like(running_mean) if update else x.new_empty((0,), dtype=torch.float32)
        rv = torch.empty_like(running_var) if update else x.new_empty((0,), dtype=torch.float32)
        return (z, p, *stats, rm, rv)

    @torch.library.custom_op("convmixer_kernels::pointwise_block_bwd", mutates_args=())
    def _bwd_op(dz: Tensor, x: Tensor, weight: Tensor, p: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                use_batch_stats: bool, activation: str, need_x: bool, need_w: bool, need_b: bool,
                need_bn: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return pointwise_backward(dz, x, weight, p, mean, rstd, scale, use_batch_stats, activation,
                                  need_x, need_w, need_b, need_bn)

    @_bwd_op.register_fake
    def _bwd_fake(dz, x, weight, p, mean, rstd, scale, use_batch_stats, activation, need_x, need_w, need_b,
                  need_bn):
        N, cin, H, W = x.shape
        cout = weight.shape[0]
        fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                      and not x.is_contiguous()) else torch.contiguous_format
        none = x.new_empty((0,), dtype=torch.float32)
        dx = x.new_empty((N, cin, H, W)).contiguous(memory_format=fmt) if need_x else x.new_empty((0,))
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else none
        db = x.new_empty((cout,)) if need_b else none
        dg = x.new_empty((cout,), dtype=torch.float32) if need_bn else none
        return dx, dw, db, dg, x.new_empty((cout,), dtype=torch.float32) if need_bn else none

    def _setup_context(ctx, inputs, output):
        x, weight, bias, bn_weight, bn_bias, _, _, use_batch_stats, _, _, activation, _ = inputs
        z, p, mean, rstd, scale, new_rm, new_rv = output
        ctx.mark_non_differentiable(p, mean, rstd, scale, new_rm, new_rv)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, p, mean, rstd, scale)
        ctx.use_batch_stats = use_batch_stats
        ctx.activation = activation
        ctx.bn_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)

    def _backward(ctx, dz, *_):
        x, weight, p, mean, rstd, scale = ctx.saved_tensors
        nx, nw, nb, ng, nbeta = ctx.needs_input_grad[:5]
        if dz is None:
            return (None,) * 12
        dx, dw, db, dgamma, dbeta = torch.ops.convmixer_kernels.pointwise_block_bwd(
            dz, x, weight, p, mean, rstd, scale, ctx.use_batch_stats, ctx.activation, nx, nw, nb, ng or nbeta)
        return (dx if nx else None, dw if nw else None, db if nb else None,
                dgamma.to(ctx.bn_dtypes[0]) if ng else None, dbeta.to(ctx.bn_dtypes[1]) if nbeta else None,
                None, None, None, None, None, None, None)

    torch.library.register_autograd("convmixer_kernels::pointwise_block_fwd", _backward,
                                    setup_context=_setup_context)


# ====================================================================== backend entry point


def pointwise_block_triton(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                           use_batch_stats: bool, momentum: float, eps: float, *, activation: str) -> Tensor:
    """The Triton backend, with the reference's signature and semantics (running buffers updated in place)."""
    _check_inputs(x, weight, bias)
    tensors = (x, weight, bias, bn_weight, bn_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    z, _, _, _, _, new_rm, new_rv = torch.ops.convmixer_kernels.pointwise_block_fwd(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, bool(use_batch_stats), float(momentum),
        float(eps), activation, save)
    if use_batch_stats and running_mean is not None and x.numel() > 0:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return z


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Errors that name the offending shape / dtype / device (RuntimeError, as F.conv2d raises)."""
    if x.dim() != 4:
        raise RuntimeError(f"pointwise_block (triton): expected a 4D [N, C, H, W] input, got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise RuntimeError(f"pointwise_block (triton): expected a [Cout, Cin, 1, 1] weight, got {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"pointwise_block (triton): input of shape {tuple(x.shape)} has {x.shape[1]} channels "
                           f"but the weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise RuntimeError(f"pointwise_block (triton): bias of shape {tuple(bias.shape)} for {weight.shape[0]} "
                           "output channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(f"pointwise_block (triton): {name} is {t.dtype} on {t.device} but the input is "
                               f"{x.dtype} on {x.device}")


def _triton_unsupported(x, weight, **config) -> Optional[str]:
    if not HAVE_TRITON:  # reached by the "cuda" backend, which reuses these kernels
        return "triton cannot be imported; fix: pip install 'triton>=3.6'"
    reason = common_unsupported(x=x, residual=False, **config)
    if reason:
        return reason
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        return f"weight of shape {tuple(weight.shape)} is not a 1x1 conv weight"
    return None


# ====================================================================== reference and front function


def pointwise_block_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              use_batch_stats: bool, momentum: float, eps: float, *,
                              activation: str) -> torch.Tensor:
    """The unfused composition, op for op as the reference module runs it."""
    p = F.conv2d(x, weight, bias)
    g = activation_reference(p, activation)
    return F.batch_norm(g, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum, eps)


def pointwise_block(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn: BatchNormCall, *,
                    activation: str, backend: str = "auto") -> Tuple[torch.Tensor, str]:
    """z = BN(act(conv1x1(x) + b)) on the chosen backend; returns (z, backend that ran)."""
    return run_block(OP, pointwise_block_reference, x, weight, bias, bn, backend, activation=activation)


backends.register_op(OP, "torch", f"{__name__}:pointwise_block_reference")
backends.register_op(OP, "triton", f"{__name__}:pointwise_block_triton", _triton_unsupported)
# The CUDA backend reuses these Triton kernels for the pointwise block (the lead's decision: a
# hand-written CUDA GEMM would not beat Triton's tensor-core GEMM here).
backends.register_op(OP, "cuda", f"{__name__}:pointwise_block_triton", _triton_unsupported)
