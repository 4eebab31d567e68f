"""Per-kernel facts the machine code cannot tell: loop trip counts, useful work, DRAM bytes.

One entry per Triton kernel name, derived from a recorded launch (its constexprs ``c``, its
scalar and tensor arguments ``a``, its grid). Kept beside ``launches.py``: when a kernel's loops
or arguments change, this table changes with it.

* ``loops``: the source loop nest, outermost first, in source order, as ``Loop(trip, children)``.
  It is matched against the SASS loops (backward branches) by position; a loop with a runtime
  bound (``runtime=True``) that the compiler split into an unrolled main loop and a remainder
  loop matches two SASS loops (unroll factor 4, LLVM's default: trips n // 4 and n % 4).
  A SASS loop left unmatched counts once (flagged in the report).
* ``fma``: useful fp32 FMAs (CUDA cores); ``mma_flops``: useful tensor-core FLOPs, i.e. those the kernel's
  algorithm must execute: a GEMM's 2*I*J*K (tile padding excluded); the tensor-core depthwise kernels'
  Toeplitz products band zeros included (executed by the tensor cores, so in the tensor bound; the conv's own
  multiply-adds are ``useful_macs``, reported, in no bound).
* ``reads``/``writes``: tensor arguments the kernel must move to/from DRAM once (a dummy
  argument standing in for an absent tensor is excluded by its condition). ``l2``: extra bytes
  re-read through L2 (halos, scratch, partials read-modify-write), reported, not in the DRAM bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class Loop:
    trip: float
    children: List["Loop"] = field(default_factory=list)
    runtime: bool = False
    name: str = ""


@dataclass
class Plan:
    loops: List[Loop]
    fma: float = 0.0
    mma_flops: float = 0.0
    reads: List[str] = field(default_factory=list)
    writes: List[str] = field(default_factory=list)
    l2_bytes: float = 0.0
    what: str = ""
    useful_macs: float = 0.0  # the math's own multiply-adds where mma_flops executes more (Toeplitz band zeros)


def cdiv(a, b):
    return -(-int(a) // int(b))


def _nchw(t):
    n, c, h, w = t.shape
    return n, c, h, w


def _rows_reached(size, tile, k, pad, flipped=False):
    """Average over tile origins of the tap rows (or columns) a depthwise tile loop visits: those whose
    input rows meet the map for some pixel of the tile (ops/triton/depthwise.py skips the others)."""
    total, origins = 0, list(range(0, size, tile))
    for o in origins:
        if flipped:  # dx: da rows h + pad - i
            lo, hi = max(o + pad - (size - 1), 0), min(o + tile - 1 + pad + 1, k)
        else:
            lo, hi = max(pad - o - (tile - 1), 0), min(size + pad - o, k)
        total += max(hi - lo, 0)
    return total / len(origins)


def _conv(c, a, grid):
    n, ch, h, w = _nchw(a["x_ptr"])
    kh, kw, th, tw = c["KH"], c["KW"], c["TH"], c["TW"]
    reads = ["x_ptr", "wt_ptr"] + (["b_ptr"] if c["HAS_BIAS"] else [])
    writes = (["a_ptr"] if c["STORE_A"] else []) + (["part_ptr"] if c["TRAIN"] else ["y_ptr"])
    if not c["TRAIN"]:
        reads += ["scale_ptr", "shift_ptr"]
    region, tile = (th + kh - 1) * (tw + kw - 1), th * tw
    halo = (region / tile - 1) * a["x_ptr"].nbytes
    staged = 2 * region / tile * a["x_ptr"].nbytes  # the window written to and read back from the scratch slot
    per_prog = a["T"] / grid[0]
    body = [Loop(cdiv(region, tile), name="stage tile + halo"),
            Loop(_rows_reached(h, th, kh, c["PT"]), name="tap rows (KW unrolled)")]
    return Plan([Loop(per_prog, body, name="tiles of this program")], fma=n * ch * h * w * kh * kw, reads=reads,
                writes=writes, l2_bytes=halo + staged,
                what="a = dwconv(x) + b" + (", tile statistics of act(a)" if c["TRAIN"] else ", y = act(a)*s + t + x"))


def _dw_apply(c, a, grid):
    return Plan([], reads=["x_ptr", "a_ptr", "scale_ptr", "shift_ptr"], writes=["y_ptr"], what="y = act(a)*s + t + x")


def _reduce(c, a, grid):
    return Plan([Loop(a["items_per_chunk"], name="tiles of the chunk")],
                reads=["dy_ptr", "a_ptr", "mean_ptr", "rstd_ptr"], writes=["part_ptr"],
                what="per-chunk sum(dy), sum(dy*xhat)")


def _input_grad(c, a, grid):
    n, ch, h, w = _nchw(a["dy_ptr"])
    kh, kw, th, tw = c["KH"], c["KW"], c["TH"], c["TW"]
    region, tile = (th + kh - 1) * (tw + kw - 1), th * tw
    per_prog = a["n_items"] / grid[0]
    body = [Loop(cdiv(region, tile), name="da over tile + halo")]
    if c["NEED_DX"]:
        body.append(Loop(_rows_reached(h, th, kh, c["PT"], flipped=True), name="dx tap rows (KW unrolled)"))
    fma = n * ch * h * w * kh * kw * int(c["NEED_DX"])
    reads = ["dy_ptr", "a_ptr", "wt_ptr", "coef_ptr"]
    writes = (["dx_ptr"] if c["NEED_DX"] else []) + (["da_ptr"] if c["STORE_DA"] else [])
    halo = (region / tile - 1) * (a["dy_ptr"].nbytes + a["a_ptr"].nbytes)
    scratch = 2 * region / tile * n * ch * h * w * 4  # da written and read back per tile
    return Plan([Loop(per_prog, body, name="tiles of this program")], fma=fma, reads=reads, writes=writes,
                l2_bytes=halo + scratch, what="da recomputed with halo; dx = dy + dwconv^T(da); da stored once")


def _weight_grad(c, a, grid):
    n, ch, h, w = _nchw(a["x_ptr"])
    kh, kw, th, tw, g = c["KH"], c["KW"], c["TH"], c["TW"], c["G"]
    band, tile = th * (tw + g - 1), th * tw
    programs = grid[0] * grid[1] * grid[2]
    staged = programs * a["items_per_chunk"] * band * c["BLOCK_C"] * a["x_ptr"].nbytes / a["x_ptr"].nbytes
    el = a["x_ptr"].nbytes / max(n * ch * h * w, 1)
    # x band staged per tap row and column group (L2 re-reads) plus the da tile re-read per program
    l2 = staged * el * 2 + (grid[1] - 1) * a["da_ptr"].nbytes
    return Plan([Loop(a["items_per_chunk"], [Loop(cdiv(band, tile), name="stage x band")], name="tiles of the chunk")],
                fma=n * ch * h * w * kh * kw, reads=["da_ptr", "x_ptr"], writes=["dwp_ptr", "dbp_ptr"], l2_bytes=l2,
                what="dw, db partials per chunk from the stored da and x (G register accumulators per program)")


def _sum_rows(c, a, grid):
    bound = "T" if "T" in a else "R"
    if bound == "T":  # ops/triton/common.py: [R, T, L] over T, SPLIT lanes
        trip = cdiv(a["T"], c.get("SPLIT", 1))
    else:
        trip = a["R"]
    # a bound equal to 1 is specialized as a constexpr: the loop is then a constant one the compiler removes
    return Plan([Loop(trip, runtime=bound not in c, name="rows")], reads=["src_ptr"], writes=["out_ptr"],
                what="fixed-order sum of partials")


def _finalize(c, a, grid):
    return Plan([Loop(cdiv(a["T"], c.get("SPLIT", 1)), runtime=True, name="tiles, SPLIT lanes in parallel")],
                reads=["partials_ptr", "weight_ptr", "bias_ptr"], writes=["out_ptr"],
                what="BatchNorm finalize (Chan combine in a fixed order, float64)")


def _gemm(c, a, grid):
    I, J, K = a["I"], a["J"], a["K"]
    kps = a.get("k_per_split", K)
    reads = ["a_ptr", "b_ptr"] + (["bias_ptr"] if c.get("HAS_BIAS") else []) + \
        (["res_ptr"] if c.get("HAS_RES") else [])
    writes = ["c_ptr"] + (["part_ptr"] if c.get("STATS") else [])
    tiles_i, tiles_j = cdiv(I, c["BLOCK_I"]), cdiv(J, c["BLOCK_J"])
    rereads = (tiles_j - 1) * I * K * 2 + (tiles_i - 1) * J * K * 2  # operand tiles re-read through L2
    return Plan([Loop(cdiv(kps, c["BLOCK_K"]), name="K")], mma_flops=2.0 * I * J * K, reads=reads, writes=writes,
                l2_bytes=rereads, what=f"GEMM {I}x{J}x{K}" + (" + bias" if c.get("HAS_BIAS") else "")
                + (" + statistics epilogue" if c.get("STATS") else "") + (" + BN apply epilogue" if c.get("APPLY") else "")
                + (f" (epilogue in {c['EPI_SPLIT']} column blocks)" if c.get("EPI_SPLIT", 1) > 1 else "")
                + (f", split-K {grid[1]}" if grid[1] > 1 else ""))


def _pw_apply(c, a, grid):
    return Plan([], reads=["p_ptr", "scale_ptr", "shift_ptr"], writes=["z_ptr"], what="z = act(p)*s + t")


def _bn_bwd(c, a, grid):
    store = c.get("STORE_DP")
    return Plan([Loop(a["tiles_per_prog"], name="row tiles")],
                reads=["dz_ptr", "p_ptr"] + (["coef_ptr"] if store else ["mean_ptr", "rstd_ptr"]),
                writes=(["dp_ptr"] if store else []) + ["part_ptr"],
                what="dp = BN_bwd(dz)*act'(p) (act, act' from one erf/tanh)" if store else "sum(dz), sum(dz*xhat)")


# ------------------------------------------------------------------ tensor-core depthwise (ops/triton/depthwise_tc.py)


def _numel(t):
    n = 1
    for d in t.shape:
        n *= int(d)
    return n


def _tc_windows(a, c):
    """Window chunks (input columns q_lo..q_hi clipped to the map, KC per dot) of each W-tile."""
    BW, KC, KW, PL, W = c["BW"], c["KC"], c["KW"], c["PL"], a["W"]
    out = []
    for wt in range(a["tiles_w"]):
        w0 = wt * BW
        lo, hi = max(w0 - PL, 0), min(w0 + BW - 1 + KW - PL, W)
        out.append(max(0, cdiv(hi - lo, KC)))
    return out


def _tc_rows(a, c):
    """Tap rows (i_lo..i_hi) each BM-row tile of the GEMM's rows (n, h) visits: those that reach the map for some
    row of the tile (a tile spanning two images takes its whole height)."""
    KH, PT, BM, H, M = c["KH"], c["PT"], c["BM"], a["H"], a["M"]
    out = []
    for mt in range(cdiv(M, BM)):
        m0, m1 = mt * BM, min(mt * BM + BM, M) - 1
        same = m0 // H == m1 // H
        h_lo, h_hi = (m0 % H, m1 % H) if same else (0, H - 1)
        out.append(max(0, min(H + PT - h_lo, KH) - max(PT - h_hi, 0)))
    return out


def _tc_conv(c, a, grid):
    """``_tc_conv_kernel``: program (channel block, row tile x W-tile); loops: tap rows reached [window chunks
    (not in the DENSE source: W <= BW = KC, one chunk)],
    trips averaged over the programs (KH, KW only shape the band). One [BC, BM, KC] x [BC, KC, BW] dot per inner
    trip. The loops have runtime bounds but are not ``runtime=True``: a loop around a dot is not unroll-split, so
    an unexpected SASS loop shows as unmatched rather than as a remainder loop."""
    BC, BM, BW, KC, KH, KW = (c[n] for n in ("BC", "BM", "BW", "KC", "KH", "KW"))
    rows, chunks = _tc_rows(a, c), _tc_windows(a, c)
    cblocks = grid[0]
    x = a["x_ptr"]
    n_el = _numel(x)
    el = x.nbytes / max(n_el, 1)
    # executed: every (tap row, chunk) dot of every program, the band's zeros and masked rows included
    dots = cblocks * sum(rows) * sum(chunks)
    mma = 2.0 * BC * BM * KC * BW * dots
    reads = ["x_ptr", "tab_ptr"] + (["b_ptr"] if c["HAS_BIAS"] else []) + \
        (["res_ptr"] if c["RES"] or c["APPLY"] else []) + (["scale_ptr", "shift_ptr"] if c["APPLY"] else [])
    writes = (["out_ptr"] if c["STORE"] else []) + (["y_ptr"] if c["APPLY"] else []) + \
        (["part_ptr"] if c["STATS"] else [])
    # L2: the input tile read once per (tap row, chunk), the weight table once per tile (rows reached), both
    # beyond their one DRAM read
    tab = a["tab_ptr"].nbytes
    T = len(rows) * len(chunks)
    x_reads = dots * BC * BM * KC * el
    l2 = max(x_reads - x.nbytes, 0) + max(tab * T * (sum(rows) / len(rows)) / KH - tab, 0)
    what = ("dx = dy + conv^T(da) (flipped kernel, transposed padding)" if c["RES"] else
            "a = conv(x) + b" + (", per-tile (count, mean, M2) of act(a)" if c["STATS"] else "")
            + (", y = act(a)*s + t + x" if c["APPLY"] else "")) + " on tensor cores (Toeplitz band)"
    # DENSE (W <= BW = KC): one chunk per tap row, the window-chunk loop compiled out
    inner = [] if c.get("DENSE") else [Loop(sum(chunks) / len(chunks), name="window chunks")]
    return Plan([Loop(sum(rows) / len(rows), inner, name="tap rows reached")],
                mma_flops=mma, useful_macs=n_el * KH * KW, reads=reads, writes=writes, l2_bytes=l2, what=what)


def _tc_wgrad(c, a, grid):
    """``_tc_wgrad_kernel``: program (channel block, tap row i, row split); loops: W-tiles [window chunks [BR-row
    steps]] (the W-tile loop is gone when tiles_w = 1 is specialized; the DENSE source, W <= BW = KC, one W-tile of
    one chunk, has neither loop: BR-row steps only). Per step one [BC, KC, BR] x [BC, BR, BW] dot; per chunk the
    banded sum through the program's scratch slot."""
    BC, BR, BW, KC, KH, KW = (c[n] for n in ("BC", "BR", "BW", "KC", "KH", "KW"))
    M, per = a["M"], a["rows_per_split"]
    chunks = _tc_windows(a, c)
    splits = grid[2]
    steps = [cdiv(max(min(per, M - s * per), 0), BR) for s in range(splits)]
    programs = grid[0] * grid[1] * grid[2]
    mma = 2.0 * BC * KC * BW * BR * grid[0] * grid[1] * sum(steps) * sum(chunks)
    step_loop = Loop(sum(steps) / splits, name="BR-row steps")
    if c.get("DENSE"):  # one W-tile of one chunk: neither loop in the source
        nest = step_loop
    else:
        nest = Loop(sum(chunks) / len(chunks), [step_loop], name="window chunks")
        if "tiles_w" not in c:  # a runtime W-tile count (> 1): its loop stays
            nest = Loop(len(chunks), [nest], name="W-tiles")
    x, da = a["x_ptr"], a["da_ptr"]
    W = a["W"]
    # L2: per tap row the da W-tile once per chunk and x's window (KC columns per chunk), less the one DRAM read;
    # the scratch slot written and read back once per chunk
    share = sum(ch * BW for ch in chunks) / W, sum(ch * KC for ch in chunks) / W
    l2 = max(KH * share[0] - 1, 0) * da.nbytes + max(KH * share[1] - 1, 0) * x.nbytes \
        + 2 * programs * sum(chunks) * BC * KC * BW * 4
    n_el = _numel(x)
    return Plan([nest], mma_flops=mma, useful_macs=n_el * KH * KW, reads=["da_ptr", "x_ptr"],
                writes=["dwp_ptr"] + (["dbp_ptr"] if c["DB"] else []), l2_bytes=l2,
                what="dw partials: D_i = X_i^T da over rows (tensor cores), banded sum per chunk"
                + ("; db" if c["DB"] else ""))


def _tc_da(c, a, grid):
    return Plan([], reads=["dy_ptr", "a_ptr", "coef_ptr"], writes=["da_ptr", "dbp_ptr"],
                what="da = act'(a) * BN_bwd(dy), materialized; db partials per tile")


PLANS: Dict[str, Callable] = {
    "_conv_kernel": _conv,
    "_apply_kernel": lambda c, a, g: _dw_apply(c, a, g) if "x_ptr" in a else _pw_apply(c, a, g),
    "_reduce_kernel": _reduce,
    "_input_grad_kernel": _input_grad,
    "_weight_grad_kernel": _weight_grad,
    "_sum_rows_kernel": _sum_rows,
    "_finalize_kernel": _finalize,
    "_gemm_kernel": _gemm,
    "_bn_bwd_kernel": _bn_bwd,
    "_tc_conv_kernel": _tc_conv,
    "_tc_wgrad_kernel": _tc_wgrad,
    "_da_kernel": _tc_da,
}


def plan_for(kernel: str, constexprs: dict, args: dict, grid) -> Optional[Plan]:
    f = PLANS.get(kernel)
    return f(constexprs, {**args, **constexprs}, grid) if f else None


UNROLL = 4


def assign_trips(sass_loops, hints: List[Loop]) -> bool:
    """Set each SASS loop's trip from the hints (by position); True when every loop matched.

    Where the SASS has fewer loops than the source at a level, the compiler fully unrolled some
    constant-trip loops (their bodies are then repeated in the parent's code, counted as such):
    the shortest constant-trip hints are dropped first until the counts agree.
    """
    ok = True
    i = 0
    hints = list(hints)
    while len(hints) > len(sass_loops):
        fixed = [h for h in hints if not h.runtime]
        if not fixed:
            return False
        hints.remove(min(fixed, key=lambda h: h.trip))
    for h_idx, h in enumerate(hints):
        left_sass, left_hints = len(sass_loops) - i, len(hints) - h_idx
        if left_sass <= 0:
            return False
        if h.runtime and left_sass > left_hints:  # unrolled main loop + remainder
            main, rest = sass_loops[i], sass_loops[i + 1]
            main.trip, rest.trip = h.trip // UNROLL, h.trip % UNROLL
            main.matched = rest.matched = True
            i += 2
            continue
        lp = sass_loops[i]
        lp.trip, lp.matched = h.trip, True
        ok = assign_trips(lp.children, h.children) and ok
        i += 1
    return ok and i == len(sass_loops)
