"""Static sm_90 evidence for the tensor-core depthwise conv (ops/triton/depthwise_tc.py, issue 11).

    python bench/static_tc.py                 # writes bench/results/static-sm90-depthwise-tc.json
    python bench/static_tc.py --configs       # also compiles a few alternative tile configurations (k = 31)

The launchers run on meta tensors at the paper's shape (N=64, C=1536, 32x32, bf16, channels_last; NCHW as a
check), k = 9 and k = 31, under ``static.launches.recording()`` and ``ops/triton/common.static_target()``;
each launch goes through ``static.report.kernel_record``, what ``inspect`` reports for it: compiled for sm_90 with
the package's toolchain, its SASS parsed (``static.sass``), loop trips, useful work and DRAM bytes from the kernel's
plan in ``static/trips.py`` (``_tc_conv``, ``_tc_wgrad``, ``_tc_da``), and timed by ``static.predict.bounds``
against ``static/ceilings.py``'s H200; the figures agree with ``inspect`` on the same launch. Every figure is a
STATIC PREDICTION, NOT A MEASUREMENT. The CUDA-core Triton path's numbers are read from the committed
bench/results/static-sm90-*.json.
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
    da, dx and dw (and the fixed-order sums). Every tensor its own storage (x, dy, a, da), as in the backend, so
    that the DRAM bytes count each once and no two as one."""
    import torch

    from convmixer_kernels.ops.triton import common
    from convmixer_kernels.ops.triton import depthwise_tc as TC
    from convmixer_kernels.static import launches

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    act = lambda: torch.empty(N, C, S, S, dtype=torch.bfloat16, device="meta").contiguous(memory_format=fmt)  # noqa
    x, dy, a, da = act(), act(), act(), act()
    w = torch.empty(C, 1, k, k, dtype=torch.bfloat16, device="meta")
    b = torch.empty(C, dtype=torch.bfloat16, device="meta")
    f32 = torch.empty(4, C, device="meta")
    pads = ((k - 1) // 2, (k - 1) // 2)
    with launches.recording() as rec, common.static_target(), torch.no_grad():
        rec.phase = "dw_block forward conv_stats"  # report.kernel_record: block "dw_block", phase the rest
        TC.conv_stats(x, w, b, 0, pads)
        rec.phase = "dw_block backward da"
        TC.pre_activation_grad(dy, a, f32, 0, True)
        rec.phase = "dw_block backward dx"
        TC.conv_transpose_add(da, dy, w, pads)
        rec.phase = "dw_block backward dw"
        TC.weight_grad(da, x, k, k, pads, db=False)  # input_grad's call: db comes from the da kernel
    return rec.launches


def _trips(loops):
    """The SASS loops' trips by nesting level, outermost first (one chain in these kernels; ``loops`` has the tree)."""
    out = []
    while loops:
        out += [lp.trip for lp in loops]
        loops = [ch for lp in loops for ch in lp.children]
    return out


def record(l, cache) -> dict:
    """``static.report.kernel_record`` (what ``inspect`` reports: trips, useful work and DRAM bytes from
    ``static/trips.py``'s plan) plus this study's extras: HMMA counts, the band's useful multiply-adds, the
    Toeplitz table's size, the mma.sync sensitivity column."""
    from convmixer_kernels.static import report, trips

    rec = report.kernel_record(l, cache)
    rec.pop("block", None)
    if "compile_error" in rec:
        return rec
    func = report._compile(l, cache)["function"]  # its loops carry the trips kernel_record just set
    plan = trips.plan_for(l.kernel, l.constexprs, l.args, l.grid) or trips.Plan([])
    dyn, static = func.dynamic_mix(), func.static_mix()
    waves = rec["waves"]
    tail = math.ceil(waves) / waves if 0 < waves < float("inf") else 1.0
    sens = max(rec["issue_us"], rec["dram_us"], rec["fma_us"], rec["tensor_us"] / MMA_SYNC_FRACTION)
    tab = l.args.get("tab_ptr")
    rec.update({
        "loop_trips": _trips(func.loops),
        "sass_static": {k: v for k, v in static.items() if v and "." not in k},
        "hmma_static": static.get("HMMA", 0), "hgmma_static": static.get("HGMMA", 0),
        "instr_per_hmma": dyn["total"] / dyn["HMMA"] if dyn.get("HMMA") else None,
        "useful_conv_fma": plan.useful_macs, "mma_flops_executed": plan.mma_flops,
        "toeplitz_table_bytes": tab.nbytes if tab is not None else 0, "tail_factor": tail,
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
    try:  # the previous run's reference: used where the committed files no longer hold the CUDA-core kernels
        previous = json.load(open(OUT)).get("cuda_core_reference", {})
    except (OSError, ValueError):
        previous = {}
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
        old = previous.get(str(k)) or previous.get(k)
        if out[k]["conv_forward_training_us"] is None and old and old.get("conv_forward_training_us") is not None:
            # the committed file was regenerated with the tensor-core path in the Triton backend (no CUDA-core conv
            # kernels in it): keep the CUDA-core figures this file already carried, with their source commit
            out[k] = dict(old, carried_from="the previous " + os.path.basename(OUT))
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
                  "kernel loop trips, MMA FLOPs, DRAM and L2 bytes from static/trips.py's plans (the same as inspect): "
                  "conv (tap rows reached per row tile, window chunks per W-tile), weight gradient (W-tiles when "
                  "not specialized away, window chunks, BR-row steps per split)",
                  "tensor-bound: the MMA FLOPs executed (the Toeplitz band's zeros included) / 788 TFLOP/s x tail; "
                  "the kernels issue mma.sync (HMMA); 'predicted_if_mma_sync_at_2_3_us' assumes HMMA reaches 2/3 of "
                  "the wgmma rate (an assumption, not measured)",
                  "DRAM: each tensor once (x, dy, a, da distinct), plus the Toeplitz table read once; the table itself "
                  "is built by torch ops on the host side of the launch (its write is listed as "
                  "toeplitz_table_bytes, not in the kernel's time)",
                  "L2 re-reads (the input tile once per tap row and chunk, the table once per tile; da and x once "
                  "per tap row in dw, and dw's scratch slot written and read back per chunk) are not in the model "
                  "(l2_extra_bytes): at k = 31 they are the main risk of these predictions",
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
        for cfg in (TC.TCConfig(8, 32, 32, 32, 8), TC.TCConfig(8, 32, 32, 32, 4), TC.TCConfig(8, 64, 32, 32, 8),
                    TC.TCConfig(4, 64, 32, 32, 8), TC.TCConfig(16, 32, 32, 32, 8), TC.TCConfig(16, 16, 32, 32, 8),
                    TC.TCConfig(8, 16, 32, 32, 4), TC.TCConfig(4, 32, 32, 32, 4), TC.TCConfig(16, 64, 32, 32, 8)):
            old = TC.conv_config
            TC.conv_config = lambda x, k, cfg=cfg: cfg
            try:
                recs = [record(l, cache) for l in capture(31) if l.phase == "dw_block forward conv_stats"]
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
