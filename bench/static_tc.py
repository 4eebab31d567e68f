"""Static sm_90 evidence for the tensor-core depthwise conv (ops/triton/depthwise_tc.py, issue 11).

    python bench/static_tc.py                 # writes bench/results/static-sm90-depthwise-tc.json
    python bench/static_tc.py --configs       # also compiles a few alternative tile configurations (k = 31)

The launchers run on meta tensors at the paper's shape (N=64, C=1536, 32x32, bf16, channels_last; NCHW as a
check), k = 9 and k = 31, under ``static.launches.recording()`` and ``ops/triton/common.static_target()``;
each launch is compiled for sm_90 with the package's toolchain (``static.report._compile``), its SASS parsed
(``static.sass``), loop trips set here (these kernels have no entry in ``static/trips.py``), and timed by
``static.predict.bounds`` against ``static/ceilings.py``'s H200. Every figure is a STATIC PREDICTION, NOT A
MEASUREMENT. The CUDA-core Triton path's numbers are read from the committed bench/results/static-sm90-*.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
OUT = os.path.join(RESULTS, "static-sm90-depthwise-tc.json")
sys.path.insert(0, REPO)

# mma.sync (HMMA, what Triton emits for a batched 3-D dot) vs the wgmma GEMM the 788 TFLOP/s ceiling was measured
# with: an assumption for a sensitivity column only (not in "predicted_us"); no measurement here backs it.
MMA_SYNC_FRACTION = 2 / 3


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret


def capture(k: int, channels_last: bool = True, N=64, C=1536, S=32):
    """The tensor-core path's launches of one training step's conv work: forward (conv_stats), the backward's
    da, dx and dw (and the fixed-order sums)."""
    import torch

    from convmixer_kernels.ops.triton import common
    from convmixer_kernels.ops.triton import depthwise_tc as TC
    from convmixer_kernels.static import launches

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(N, C, S, S, dtype=torch.bfloat16, device="meta").contiguous(memory_format=fmt)
    w = torch.empty(C, 1, k, k, dtype=torch.bfloat16, device="meta")
    b = torch.empty(C, dtype=torch.bfloat16, device="meta")
    f32 = torch.empty(4, C, device="meta")
    pads = ((k - 1) // 2, (k - 1) // 2)
    with launches.recording() as rec, common.static_target(), torch.no_grad():
        rec.phase = "forward conv_stats"
        TC.conv_stats(x, w, b, 0, pads)
        rec.phase = "backward da"
        TC.pre_activation_grad(x, x, f32, 0, True)
        rec.phase = "backward dx"
        TC.conv_transpose_add(x, x, w, pads)
        rec.phase = "backward dw"
        TC.weight_grad(x, x, k, k, pads, db=False)  # input_grad's call: db comes from the da kernel
    return rec.launches


def _depth(loops):
    return 1 + max((_depth(lp.children) for lp in loops), default=0) if loops else 0


def _set(loops, trips):
    """Trips by nesting level (outermost first) for a single chain of loops; True when the chain matched."""
    ok = True
    for lp in loops:
        lp.trip, lp.matched = (trips[0], True) if trips else (1.0, False)
        ok = ok and bool(trips)
        ok = _set(lp.children, trips[1:]) and ok
    return ok


def _conv_plan(l):
    """Trips (tap rows reached per program, window chunks), executed MMA FLOPs, useful FMAs, DRAM bytes."""
    c, a = l.constexprs, {**l.args, **l.constexprs}  # ints equal to 1 are specialized as constexprs
    KH, KW, PT, PL, BC, BM, BW, KC = (c[n] for n in ("KH", "KW", "PT", "PL", "BC", "BM", "BW", "KC"))
    H, W, M, C = a["H"], a["W"], a["M"], a["C"]
    tiles_m = -(-M // BM)
    rows = 0
    for mt in range(tiles_m):
        m0, m1 = mt * BM, min(mt * BM + BM, M) - 1
        same = m0 // H == m1 // H
        h_lo, h_hi = (m0 % H, m1 % H) if same else (0, H - 1)
        rows += max(0, min(H + PT - h_lo, KH) - max(PT - h_hi, 0))
    rows /= tiles_m
    chunks = 0
    tiles_w = a["tiles_w"]
    for wt in range(tiles_w):
        w0 = wt * BW
        lo, hi = max(w0 - PL, 0), min(w0 + BW - 1 + KW - PL, W)
        chunks += max(0, -(-(hi - lo) // KC))
    chunks /= tiles_w
    programs = l.programs
    mma = 2.0 * BC * BM * KC * BW * rows * chunks * programs
    N = M // H
    el = a["x_ptr"].nbytes / (N * C * H * W)
    unit = N * C * H * W * el
    tab = a["tab_ptr"].nbytes
    reads = unit * (1 + int(c["RES"]) + int(c["APPLY"])) + tab
    writes = unit * (int(c["STORE"]) + int(c["APPLY"])) + (a["part_ptr"].nbytes if c["STATS"] else 0)
    # L2 (not in the DRAM bound): the input tile re-read per tap row, the table per row tile
    l2 = unit * (rows - 1) + tab * (tiles_m - 1)
    return [rows, chunks], mma, N * C * H * W * KH * KW, reads + writes, l2, tab


def _wgrad_plan(l):
    c, a = l.constexprs, {**l.args, **l.constexprs}  # ints equal to 1 are specialized as constexprs
    KH, KW, PL, BC, BR, BW, KC = (c[n] for n in ("KH", "KW", "PL", "BC", "BR", "BW", "KC"))
    H, W, M, C = a["H"], a["W"], a["M"], a["C"]
    tiles_w = a["tiles_w"]
    chunks = 0
    for wt in range(tiles_w):
        w0 = wt * BW
        lo, hi = max(w0 - PL, 0), min(w0 + BW - 1 + KW - PL, W)
        chunks += max(0, -(-(hi - lo) // KC))
    steps = -(-a["rows_per_split"] // BR)
    programs = l.programs
    mma = 2.0 * BC * KC * BW * BR * steps * chunks * programs
    N = M // H
    unit = a["x_ptr"].nbytes
    moved = 2 * unit + a["dwp_ptr"].nbytes + (a["dbp_ptr"].nbytes if c["DB"] else 0)
    l2 = 2 * unit * (KH - 1)  # da and x read once per tap row
    return [chunks, steps], mma, N * C * H * W * KH * KW, moved, l2, 0


def record(l, cache) -> dict:
    from convmixer_kernels.static import predict, report

    got = report._compile(l, cache)
    rec = {"phase": l.phase, "kernel": l.kernel, "grid": list(l.grid), "programs": l.programs,
           "num_warps": l.num_warps, "num_stages": l.num_stages,
           "constexprs": {k: v for k, v in l.constexprs.items() if isinstance(v, (int, bool, str, float))}}
    if got["error"]:
        rec["compile_error"] = got["error"]
        return rec
    comp, func = got["compiled"], got["function"]
    table = 0
    if l.kernel == "_tc_conv_kernel":
        trips, mma, fma, moved, l2, table = _conv_plan(l)
        what = "conv^T(da) + dy (flipped kernel, transposed padding)" if l.constexprs["RES"] else \
            "a = conv(x) + b, per-tile (count, mean, M2) of act(a)"
    elif l.kernel == "_tc_wgrad_kernel":
        trips, mma, fma, moved, l2, _ = _wgrad_plan(l)
        what = "dw partials: D_i = X_i^T da over rows (tensor cores), banded sum per program; db"
    else:
        trips, mma, fma, l2 = [], 0.0, 0.0, 0.0
        a = {**l.args, **l.constexprs}
        moved = sum(v.nbytes for v in a.values() if hasattr(v, "nbytes") and v.nbytes > 1e6)
        what = {"_da_kernel": "da = act'(a) * BN_bwd(dy), materialized; db partials per tile",
                "_sum_rows_kernel": "fixed-order sum of partials"}.get(l.kernel, "")
        if l.kernel == "_sum_rows_kernel":
            trips = [max(1, a["T"] // l.constexprs.get("SPLIT", 1))]
            moved = a["src_ptr"].nbytes + a["out_ptr"].nbytes
        if l.kernel == "_da_kernel":
            moved = a["dy_ptr"].nbytes + a["a_ptr"].nbytes + a["da_ptr"].nbytes + a["dbp_ptr"].nbytes
    for lp in func.all_loops():
        lp.trip, lp.matched = 1.0, False
    matched = _set(func.loops, trips) if func.loops else not trips
    dyn = func.dynamic_mix()
    occ = predict.occupancy(comp.resources.registers, comp.dynamic_smem + comp.resources.static_smem, l.num_warps)
    b = predict.bounds(dyn, l.num_warps, l.programs, occ, fma if not mma else 0.0, mma, moved)
    waves = b["waves"]
    tail = math.ceil(waves) / waves if 0 < waves < float("inf") else 1.0
    sens = max(b["issue_us"], b["dram_us"], b["fma_us"], b["tensor_us"] / MMA_SYNC_FRACTION)
    static = func.static_mix()
    rec.update({
        "what": what, "registers": comp.resources.registers, "spill_bytes": comp.resources.spill_bytes,
        "smem_bytes": comp.dynamic_smem + comp.resources.static_smem, "blocks_per_sm": occ.blocks_per_sm,
        "occupancy": occ.occupancy, "occupancy_factor": occ.factor, "occupancy_limiter": occ.limiter,
        "loop_trips": trips, "loops_matched": matched, "loops": [lp.as_dict() for lp in func.loops],
        "sass_static": {k: v for k, v in static.items() if v and "." not in k},
        "hmma_static": static.get("HMMA", 0), "hgmma_static": static.get("HGMMA", 0),
        "mix_per_warp": {k: v for k, v in dyn.items() if v and "." not in k},
        "instr_per_hmma": dyn["total"] / dyn["HMMA"] if dyn.get("HMMA") else None,
        "useful_conv_fma": fma, "mma_flops_executed": mma, "dram_bytes": moved, "l2_extra_bytes": l2,
        "toeplitz_table_bytes": table, "tail_factor": tail, **b,
        "predicted_if_mma_sync_at_2_3_us": sens})
    return rec


def cuda_core_reference():
    """The CUDA-core Triton path's committed static numbers (k = 9: the 1536/20 file; k = 31: the k sweep)."""
    out = {}
    try:
        r9 = json.load(open(os.path.join(RESULTS, "static-sm90-1536-20-k9-p7.json")))
        sweep = json.load(open(os.path.join(RESULTS, "static-sm90-dw-k-sweep.json")))
    except OSError as e:
        return {"error": str(e)}
    rows = {9: (r9["kernels"], r9["blocks"], r9["meta"]["commit"])}
    for row in sweep["sweep"]:
        if row["kernel_size"] == 31:
            rows[31] = (row["kernels"], row["blocks"], sweep["meta"]["commit"])
    for k, (kernels, blocks, commit) in rows.items():
        ks = [x for x in kernels if x.get("block", "dw_block") == "dw_block" and not x.get("candidate")]
        pick = lambda name, phase: next((x["predicted_us"] for x in ks if x["kernel"] == name  # noqa: E731
                                         and x["phase"] == phase), None)
        out[k] = {"source_commit": commit,
                  "conv_forward_training_us": pick("_conv_kernel", "forward (training)"),
                  "input_grad_us (da + dx)": pick("_input_grad_kernel", "backward"),
                  "weight_grad_us": pick("_weight_grad_kernel", "backward"),
                  "blocks": {b["phase"]: b["predicted_us"] for b in blocks
                             if b["block"] == "dw_block" and b.get("backend", "triton") == "triton"}}
    return out


def summarize(recs, ref, k):
    get = lambda phase: sum(r.get("predicted_us", 0) for r in recs if r["phase"] == phase)  # noqa: E731
    fwd, da, dx, dw = get("forward conv_stats"), get("backward da"), get("backward dx"), get("backward dw")
    s = {"forward_conv_stats_us": fwd, "backward_da_us": da, "backward_dx_us": dx, "backward_dw_us": dw,
         "conv_work_fwd_plus_bwd_us": fwd + da + dx + dw}
    if isinstance(ref, dict) and k in ref:
        r = ref[k]
        blocks = r["blocks"]
        # the block with the tensor-core conv work in place of the CUDA-core kernels; the rest (finalize, apply,
        # grad_sums and their sums) as committed
        other = blocks.get("forward+backward (training)", 0) - (r["conv_forward_training_us"] or 0) \
            - (r["input_grad_us (da + dx)"] or 0) - (r["weight_grad_us"] or 0)
        s.update({"cuda_core_conv_forward_us": r["conv_forward_training_us"],
                  "cuda_core_input_grad_us": r["input_grad_us (da + dx)"],
                  "cuda_core_weight_grad_us": r["weight_grad_us"],
                  "cuda_core_block_fwd_bwd_us": blocks.get("forward+backward (training)"),
                  "block_fwd_bwd_with_tc_us": other + fwd + da + dx + dw,
                  "block_rest_us (finalize, apply, grad_sums, sums; CUDA-core path as committed)": other})
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", action="store_true", help="also compile alternative tile configurations at k = 31")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return subprocess.call([sys.executable, __file__] + (argv or sys.argv[1:]), env=_env())
    from convmixer_kernels.static import LABEL, report

    ref = cuda_core_reference()
    result = {"label": LABEL, "meta": report.meta(),
              "workload": {"batch": 64, "dim": 1536, "grid": 32, "dtype": "bf16", "activation": "gelu",
                           "what": "tensor-core depthwise conv (ops/triton/depthwise_tc.py): forward with statistics, "
                                   "da, dx, dw"},
              "assumptions": [
                  "kernel loop trips set here by nesting level: conv (tap rows reached per row tile, window chunks), "
                  "weight gradient (window chunks x W-tiles, row steps per split)",
                  "tensor-bound: the MMA FLOPs executed (the Toeplitz band's zeros included) / 788 TFLOP/s x tail; "
                  "the kernels issue mma.sync (HMMA); 'predicted_if_mma_sync_at_2_3_us' assumes HMMA reaches 2/3 of "
                  "the wgmma rate (an assumption, not measured)",
                  "DRAM: each tensor once, plus the Toeplitz table read once; the table itself is built by torch "
                  "ops on the host side of the launch (its write is listed as toeplitz_table_bytes, not in the "
                  "kernel's time)",
                  "L2 re-reads (the input tile once per tap row, da and x once per tap row in dw) are not in the "
                  "model (l2_extra_bytes): at k = 31 they are the main risk of these predictions",
              ],
              "cuda_core_reference": ref, "runs": []}
    cache: dict = {}
    for k, cl in ((9, True), (31, True), (9, False), (31, False)):
        recs = [record(l, cache) for l in capture(k, cl)]
        result["runs"].append({"kernel_size": k, "layout": "channels_last" if cl else "nchw", "kernels": recs,
                               "summary": summarize(recs, ref if cl else None, k)})
        print(f"k={k} {'channels_last' if cl else 'nchw'}: " + ", ".join(
            f"{n} {v:.1f}" for n, v in result["runs"][-1]["summary"].items() if isinstance(v, float)), file=sys.stderr)
    if args.configs:
        from convmixer_kernels.ops.triton import depthwise_tc as TC

        alts = []
        for cfg in (TC.TCConfig(8, 32, 32, 32, 4), TC.TCConfig(8, 64, 32, 32, 8), TC.TCConfig(4, 128, 32, 32, 8),
                    TC.TCConfig(8, 128, 32, 32, 8), TC.TCConfig(16, 64, 32, 32, 8), TC.TCConfig(4, 64, 32, 32, 4)):
            old = TC.conv_config
            TC.conv_config = lambda x, k, cfg=cfg: cfg
            try:
                recs = [record(l, cache) for l in capture(31) if l.phase == "forward conv_stats"]
            finally:
                TC.conv_config = old
            r = recs[0]
            alts.append({"config": cfg.__dict__, **{n: r.get(n) for n in (
                "registers", "spill_bytes", "blocks_per_sm", "instr_per_hmma", "issue_us", "tensor_us", "dram_us",
                "predicted_us", "bound", "compile_error")}})
            print("config", cfg, {n: alts[-1][n] for n in ("registers", "spill_bytes", "predicted_us", "bound")},
                  file=sys.stderr)
        result["forward_configs_k31"] = alts
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
