"""``inspect`` end to end for one workload: capture, compile, count, predict; JSON and a table.

Every time here is a static prediction, not a measurement (see ``predict.py`` for the model).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import LABEL, launches, predict, sass, toolchain, traffic, trips
from .ceilings import H200

SCHEMA = "convmixer-kernels-static/1"
# design.md section 4: fused per-module budgets, in tensor passes (None: no budget stated)
BUDGETS = {("dw_block", "forward (training)"): 5, ("dw_block", "forward (eval)"): 2, ("dw_block", "backward"): 6,
           ("pw_block", "forward (training)"): 4, ("pw_block", "forward (eval)"): None, ("pw_block", "backward"): 9,
           # one interior layer of the fused stack (design.md 3.3, section 4's whole-layer column); the
           # low-memory backward adds the depthwise conv's recompute (read p, write a)
           ("layer_stack", "forward (training)"): 5, ("layer_stack", "backward"): 13,
           ("layer_stack", "backward (memory=lowest)"): 15}
EAGER_BUDGETS = {("dw_block", "forward (training)"): 10, ("dw_block", "forward (eval)"): 7,
                 ("dw_block", "backward"): 15, ("pw_block", "forward (training)"): 7, ("pw_block", "backward"): 12,
                 ("layer_stack", "forward (training)"): 17, ("layer_stack", "backward"): 27}
OPS = ("dw_block", "pw_block", "layer_stack")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Workload:
    dim: int = 1536
    depth: int = 20
    batch: int = 64
    image_size: int = 224
    patch_size: int = 7
    kernel_size: int = 9
    dtype: str = "bf16"
    layout: str = "channels_last"
    activation: str = "gelu"
    config: str = ""

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def shape(self) -> launches.Shape:
        return launches.Shape(self.batch, self.dim, self.grid_size, self.kernel_size, DTYPES[self.dtype],
                              self.layout == "channels_last", self.activation)


def _git(*args) -> Optional[str]:
    try:
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def meta() -> dict:
    return {"label": LABEL, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "tools": toolchain.versions(), "ceilings": H200.as_dict(),
            "model": (predict.__doc__ or "").strip().splitlines()[0],
            "assumptions": ASSUMPTIONS}


ASSUMPTIONS = [
    "launches: the package's own launchers on meta tensors with an sm_90 policy (132 SMs, default configurations, "
    "no autotuning); compiled ahead of time with triton.compile for sm_90a",
    "dynamic instruction mix: SASS loop bodies (backward branches) x trip counts from static/trips.py; both sides "
    "of forward branches counted",
    "issue-bound: warp-instructions of the busiest SM / (4 schedulers x 1.98 GHz x occupancy factor), factor = "
    "min(1, resident warps per scheduler / 4)",
    "FMA-bound: issued FFMA x 64 FLOP / 67 TFLOP/s; tensor-bound: useful GEMM FLOPs / 788 TFLOP/s, "
    "times ceil(waves) / waves (a partly filled last wave of blocks leaves tensor cores idle)",
    "DRAM-bound: each tensor a kernel must read or write moved once / 4.3 TB/s (halos, scratch and operand "
    "re-reads assumed to hit L2; reported separately)",
    "predicted = max of the four; floor = max(DRAM-bound, useful FMAs / FMA peak, tensor-bound); launch gaps, "
    "latency chains and cache misses are not modelled",
    "CUDA extension (--backend cuda/all): grids from csrc/kernels/plan.h (compiled with g++), each used kernel "
    "instance compiled alone with nvcc -arch=sm_90; SASS loops matched by role (staging, tile, row-group loops) with "
    "trips from the plan; vector/scalar staging resolved from the plan; the activation and the training/eval "
    "epilogue are template arguments, so each launch's instance holds only its own",
    "training step = depth x (depthwise block + pointwise block, forward training + backward); stem, head and "
    "optimizer not included",
    "eager at its roofline: every counted eager op at max(its bytes / 4.3 TB/s, its arithmetic: 1x1-conv GEMMs at "
    "788 TFLOP/s, the depthwise conv at the fp32-FMA peak, as cuDNN's and the native depthwise kernels use no tensor "
    "cores); a lower bound on eager's time, so the fused step's speedup over it is a lower bound on the speedup",
]


def _compile(launch: launches.Launch, cache: Dict[tuple, dict]) -> dict:
    key = launch.key()
    if key not in cache:
        fn, sig, cx, attrs, opts = launch.compile_inputs
        try:
            c = toolchain.compile_triton(fn, sig, cx, attrs, opts)
            funcs = [f for f in sass.parse(c.sass) if f.name == c.name] or sass.parse(c.sass)
            cache[key] = {"compiled": c, "function": funcs[0], "error": None}
        except Exception as e:  # a launch that does not compile for sm_90 is a finding, reported per kernel
            cache[key] = {"compiled": None, "function": None, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    return cache[key]


def kernel_record(launch: launches.Launch, cache: Dict[tuple, dict]) -> dict:
    rec = {"block": launch.phase.split(" ", 1)[0], "phase": launch.phase.split(" ", 1)[1], "kernel": launch.kernel,
           "grid": list(launch.grid), "programs": launch.programs, "num_warps": launch.num_warps,
           "num_stages": launch.num_stages, "candidate": launch.candidate,
           "constexprs": {k: v for k, v in launch.constexprs.items() if not isinstance(v, (type(None),))}}
    got = _compile(launch, cache)
    if got["error"]:
        rec["compile_error"] = got["error"]
        return rec
    c, func = got["compiled"], got["function"]
    plan = trips.plan_for(launch.kernel, launch.constexprs, launch.args, launch.grid) or trips.Plan([])
    # fresh trip assignment per launch (loops are shared through the compile cache)
    for lp in func.all_loops():
        lp.trip, lp.matched = 1.0, False
    matched = trips.assign_trips(func.loops, plan.loops)
    dyn = func.dynamic_mix()
    occ = predict.occupancy(c.resources.registers, c.dynamic_smem + c.resources.static_smem, launch.num_warps)
    tensors = {k: v for k, v in launch.args.items() if isinstance(v, launches.TensorArg)}
    moved, seen = 0, set()
    for name in plan.reads + plan.writes:
        t = tensors.get(name)
        if t is None:
            continue
        key = (t.storage, name in plan.writes and name in plan.reads, name in plan.writes)
        if key in seen:
            continue
        seen.add(key)
        moved += t.nbytes
    b = predict.bounds(dyn, launch.num_warps, launch.programs, occ, plan.fma, plan.mma_flops, moved)
    ffma = dyn.get("FFMA", 0) + dyn.get("HFMA2", 0)
    rec.update({
        "what": plan.what, "registers": c.resources.registers, "spill_bytes": c.resources.spill_bytes,
        "stack_bytes": c.resources.stack, "smem_bytes": c.dynamic_smem + c.resources.static_smem,
        "barriers": c.resources.barriers, "blocks_per_sm": occ.blocks_per_sm, "occupancy": occ.occupancy,
        "occupancy_factor": occ.factor, "occupancy_limiter": occ.limiter,
        "static_instructions": func.static_mix()["total"], "loops": [lp.as_dict() for lp in func.loops],
        "loops_matched": matched, "mix_per_warp": {k: v for k, v in dyn.items() if v},
        "instr_per_ffma": dyn["total"] / ffma if ffma else None,
        "useful_fma": plan.fma, "mma_flops": plan.mma_flops,
        "issued_fma_per_useful": (ffma * 32 * launch.num_warps * launch.programs / plan.fma) if plan.fma else None,
        "dram_bytes": moved, "l2_extra_bytes": plan.l2_bytes, **b,
        "hgmma": dyn.get("HGMMA", 0) > 0, "local_memory_in_loops": _local_in_loops(func),
    })
    return rec


def _local_in_loops(func) -> bool:
    for ins in func.instrs:
        if ins.cls in ("LDL", "STL") and func.multiplier(ins.addr) > 1:
            return True
    return False


def block_summaries(kernels: List[dict], shape: launches.Shape, eager: Dict[str, dict]) -> List[dict]:
    out = []
    unit = shape.unit_bytes
    m = shape.batch * shape.size * shape.size
    for (block, phase), budget in BUDGETS.items():
        ks = [k for k in kernels if k["block"] == block and k["phase"] == phase and not k["candidate"]]
        if not ks:
            continue
        fma = sum(k.get("useful_fma", 0) for k in ks)
        mma = sum(k.get("mma_flops", 0) for k in ks)
        dram = sum(k.get("dram_bytes", 0) for k in ks)
        ideal_bytes = (budget or dram / unit) * unit
        floor = max(ideal_bytes / H200.dram_bytes_per_s, 2 * fma / H200.fma_fp32_flops + mma / H200.tensor_bf16_flops)
        ev = eager.get(block, {}).get("backward" if phase == "backward" else "forward") if phase != "forward (eval)" \
            else None
        out.append({"block": block, "phase": phase, "kernels": len(ks),
                    "predicted_us": sum(k.get("predicted_us", 0) for k in ks), "floor_us": floor * 1e6,
                    "dram_bytes": dram, "passes": dram / unit, "budget_passes": budget,
                    "within_budget": None if budget is None else dram / unit <= budget + 0.05,
                    "eager_passes_counted": ev["passes"] if ev else None,
                    "eager_passes_design": EAGER_BUDGETS.get((block, phase)),
                    "useful_fma": fma, "mma_flops": mma, "pixels": m})
    for block in OPS:
        parts = [b for b in out if b["block"] == block and b["phase"] in ("forward (training)", "backward")]
        if len(parts) == 2:
            out.append({"block": block, "phase": "forward+backward (training)", "kernels": sum(p["kernels"] for p in parts),
                        **{k: sum(p[k] for p in parts) for k in ("predicted_us", "floor_us", "dram_bytes", "passes")},
                        "budget_passes": sum(p["budget_passes"] for p in parts),
                        "eager_passes_counted": sum(p["eager_passes_counted"] or 0 for p in parts)})
    return out


def inspect_workload(w: Workload, backends=("triton", "cuda"), all_configs: bool = False,
                     progress=None) -> dict:
    reason = toolchain.missing_tools()
    if reason:
        raise RuntimeError(reason)
    shape = w.shape()
    result = {"schema": SCHEMA, "meta": meta(), "workload": dict(w.__dict__, grid_size=w.grid_size),
              "kernels": [], "blocks": [], "step": {}, "memory": {}, "cuda_extension": None}
    eager = {op: traffic.eager_block_traffic(op, shape) for op in ("dw_block", "pw_block")}
    result["eager"] = {op: {ph: {"bytes": v["bytes"], "passes": v["passes"], "ops": v["ops"]} for ph, v in e.items()}
                       for op, e in eager.items()}
    if "triton" in backends:
        cache: Dict[tuple, dict] = {}
        for op in OPS:
            for launch in launches.capture(op, shape, all_configs=all_configs):
                if progress:
                    progress(f"{launch.phase}: {launch.kernel} grid {launch.grid}")
                result["kernels"].append(dict(kernel_record(launch, cache), backend="triton"))
        result["blocks"] = [dict(b, backend="triton") for b in block_summaries(result["kernels"], shape, eager)]
        per_block = [b for b in result["blocks"] if b["phase"] == "forward+backward (training)"
                     and b["block"] in ("dw_block", "pw_block")]
        per_layer = sum(b["predicted_us"] for b in per_block)
        floor = sum(b["floor_us"] for b in per_block)
        dram = sum(b["dram_bytes"] for b in per_block)
        eager_bytes = sum(e[ph]["bytes"] for e in eager.values() for ph in e)
        result["step"] = {"what": "depth x (dw + pw block, forward training + backward); stem/head/optimizer excluded",
                          "per_layer_predicted_us": per_layer, "per_layer_floor_us": floor,
                          "predicted_ms": w.depth * per_layer / 1e3, "floor_ms": w.depth * floor / 1e3,
                          "images_per_s_predicted": w.batch / (w.depth * per_layer / 1e6) if per_layer else None,
                          "dram_bytes_per_layer": dram, "eager_dram_bytes_per_layer": eager_bytes,
                          "dram_vs_eager": dram / eager_bytes if eager_bytes else None,
                          "target_dram_vs_eager": 0.45, **eager_step(w, eager, shape, per_layer)}
        fs = {op: launches.fused_saved(op, shape) for op in ("dw_block", "pw_block")}
        es = {op: traffic.eager_saved(op, shape) for op in ("dw_block", "pw_block")}
        fused_layer, eager_layer = sum(v[0] for v in fs.values()), sum(v[0] for v in es.values())
        result["memory"] = {
            "how": "saved_tensors_hooks around one training forward of each block on meta tensors at full shape",
            "saved_per_layer_fused_bytes": fused_layer, "saved_per_layer_eager_bytes": eager_layer,
            "saved_per_layer_fused_units": fused_layer / shape.unit_bytes,
            "saved_per_layer_eager_units": eager_layer / shape.unit_bytes,
            "per_block": {op: {"fused_bytes": fs[op][0], "fused_tensors": fs[op][1], "eager_bytes": es[op][0],
                               "eager_tensors": es[op][1]} for op in fs},
            "peak_saved_fused_bytes": w.depth * fused_layer, "peak_saved_eager_bytes": w.depth * eager_layer,
            "peak_ratio": fused_layer / eager_layer if eager_layer else None, "target_peak_ratio": 0.5}
        result["stack"] = stack_summary(w, shape, result["blocks"], result["kernels"], eager_bytes, eager_layer,
                                        result["step"])
    if "cuda" in backends:
        result["cuda_extension"] = cuda_launches(w, shape, progress)
        result["blocks"] += cuda_block_summaries(result["cuda_extension"].get("kernels", []), shape, eager)
    return result


def eager_step(w: Workload, eager: Dict[str, dict], shape: launches.Shape, per_layer_us: float) -> dict:
    """Eager's training step at its roofline (traffic.eager_roofline: each op at max(bytes, arithmetic) against the
    ceilings), and the fused step's speedup over it: a lower bound on the speedup over eager, which the ">= 3x
    eager's predicted step" target is checked against until eager is measured on a GPU."""
    roof = traffic.eager_roofline(eager, shape, H200)
    layer = sum(t for phases in roof.values() for t in phases.values())
    return {"eager_roofline_per_layer_us": layer, "eager_roofline_ms": w.depth * layer / 1e3,
            "eager_roofline_per_block_us": roof,
            "speedup_vs_eager_roofline": layer / per_layer_us if per_layer_us else None,
            "target_speedup_vs_eager": 3.0}


def stack_summary(w: Workload, shape: launches.Shape, blocks: List[dict], kernels: List[dict], eager_bytes: float,
                  eager_saved: float, per_block_step: dict) -> dict:
    """The fused layer stack's training step (interior layers x depth; the stack's final apply, stem and head
    excluded), its traffic and saved bytes against eager, the low-memory mode's cost, and the kernels one
    eval layer launches."""
    get = lambda phase: next((b for b in blocks if b["block"] == "layer_stack" and b["phase"] == phase  # noqa: E731
                              and b.get("backend", "triton") == "triton"), None)
    both, low, fwd = get("forward+backward (training)"), get("backward (memory=lowest)"), get("forward (training)")
    if both is None:
        return {}
    per_layer = both["predicted_us"]
    saved = {mode: launches.stack_saved(shape, mode)[0] for mode in ("low", "lowest")}
    eval_kernels = sum(1 for k in kernels if k["phase"] == "forward (eval)" and not k["candidate"]
                       and k["block"] in ("dw_block", "pw_block"))
    low_layer = fwd["predicted_us"] + low["predicted_us"] if (fwd and low) else None
    return {"what": "memory='low': depth x one interior layer of the fused stack (forward training + backward); the stack's final "
                    "apply, stem, head and optimizer excluded",
            "per_layer_predicted_us": per_layer, "per_layer_floor_us": both["floor_us"],
            "predicted_ms": w.depth * per_layer / 1e3, "floor_ms": w.depth * both["floor_us"] / 1e3,
            "images_per_s_predicted": w.batch / (w.depth * per_layer / 1e6) if per_layer else None,
            "speedup_vs_per_block_fusion": per_block_step["per_layer_predicted_us"] / per_layer if per_layer else None,
            "speedup_vs_eager_roofline": (per_block_step["eager_roofline_per_layer_us"] / per_layer
                                          if per_layer and per_block_step.get("eager_roofline_per_layer_us") else None),
            "dram_bytes_per_layer": both["dram_bytes"], "passes_per_layer": both["passes"],
            "dram_vs_eager": both["dram_bytes"] / eager_bytes if eager_bytes else None, "target_dram_vs_eager": 0.45,
            "saved_per_layer_bytes": saved["low"], "saved_per_layer_units": saved["low"] / shape.unit_bytes,
            "saved_vs_eager": saved["low"] / eager_saved if eager_saved else None, "target_saved_vs_eager": 0.5,
            "lowest_memory": {"saved_per_layer_bytes": saved["lowest"], "saved_per_layer_units": saved["lowest"] / shape.unit_bytes,
                           "saved_vs_eager": saved["lowest"] / eager_saved if eager_saved else None,
                           "target_saved_vs_eager": 0.3, "per_layer_predicted_us": low_layer,
                           "cost_vs_normal": low_layer / per_layer if (low_layer and per_layer) else None},
            "inference_kernels_per_layer": eval_kernels, "target_inference_kernels_per_layer": 2}


def cuda_block_summaries(kernels: List[dict], shape: launches.Shape, eager: Dict[str, dict]) -> List[dict]:
    """Per-phase sums of the CUDA launches (``"backend": "cuda"``); a phase the planner refuses ("too wide") or
    that does not compile is reported with its reason instead of a number."""
    ok = [k for k in kernels if "predicted_us" in k]
    bad = {}
    for k in kernels:
        if "predicted_us" not in k:
            bad.setdefault(k["phase"], k.get("error") or k.get("compile_error"))
    if "forward (training)" in bad or "backward" in bad:
        bad["forward+backward (training)"] = bad.get("forward (training)") or bad.get("backward")
    out = [dict(b, backend="cuda") for b in block_summaries(ok, shape, eager) if b["phase"] not in bad]
    for phase, why in bad.items():
        out.append({"block": "dw_block", "phase": phase, "backend": "cuda", "error": why, "kernels": 0,
                    "predicted_us": None, "floor_us": None})
    return out


def cuda_launches(w: Workload, shape: launches.Shape, progress=None) -> dict:
    """The CUDA extension's launches of one depthwise-block training step (and the eval forward), planned by
    csrc/kernels/plan.h (a g++-built planner), each instance compiled alone with nvcc for sm_90: resources, dynamic
    mix (loop roles x plan trips, static/cuda_plans.py), bytes from the plan, predicted time."""
    from . import cuda_plans

    reason = cuda_plans.missing_tools()
    if reason:
        return {"error": reason}
    try:
        ls, pl = cuda_plans.launches(shape, w.dtype)
        if progress:
            progress(f"cuda: {len(set(l.instance for l in ls))} kernel instances (nvcc sm_90)")
        compiled = cuda_plans.compile_instances([l.instance for l in ls if not l.error])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    out = []
    for l in ls:
        rec = {"backend": "cuda", "block": "dw_block", "phase": l.phase, "kernel": l.kernel, "instance": l.instance,
               "role": l.role, "grid": [l.blocks, 1, 1], "programs": l.blocks, "threads": l.threads, "num_warps": l.threads // 32,
               "num_stages": None, "candidate": False, "constexprs": {}, "plan": l.plan}
        if l.error:
            rec["error"] = l.error
            out.append(rec)
            continue
        got = compiled.get(l.instance)
        if got is None:
            rec["compile_error"] = f"instance {l.instance} not found in the nvcc output"
            out.append(rec)
            continue
        c, func = got
        matched = cuda_plans.cuda_trips(func, l, shape, pl["vec_ok"])
        dyn = func.dynamic_mix()
        smem = l.smem + c.resources.static_smem
        occ = predict.occupancy(c.resources.registers, smem, l.threads // 32)
        wk = cuda_plans.work(l, shape, w.dtype)
        b = predict.bounds(dyn, l.threads // 32, l.blocks, occ, wk["fma"], 0.0, wk["dram"])
        ffma = dyn.get("FFMA", 0) + dyn.get("HFMA2", 0)
        rec.update({
            "what": wk["what"], "function": c.name, "registers": c.resources.registers,
            "spill_bytes": c.resources.spill_bytes, "stack_bytes": c.resources.stack, "smem_bytes": smem,
            "static_smem_bytes": c.resources.static_smem, "dynamic_smem_bytes": l.smem,
            "barriers": c.resources.barriers, "blocks_per_sm": occ.blocks_per_sm, "occupancy": occ.occupancy,
            "occupancy_factor": occ.factor, "occupancy_limiter": occ.limiter,
            "static_instructions": func.static_mix()["total"], "loops": [lp.as_dict() for lp in func.loops],
            "loops_matched": matched, "mix_per_warp": {k: v for k, v in dyn.items() if v},
            "instr_per_ffma": dyn["total"] / ffma if ffma else None, "useful_fma": wk["fma"], "mma_flops": 0.0,
            "issued_fma_per_useful": (ffma * l.threads * l.blocks / wk["fma"]) if wk["fma"] else None,
            "dram_bytes": wk["dram"], "l2_extra_bytes": None, **b, "hgmma": False,
            "local_memory_in_loops": _local_in_loops(func)})
        out.append(rec)
    functions = [{"function": k["function"], "instance": k["instance"], "source": "csrc/kernels (instance compiled alone)",
                  "registers": k["registers"], "spill_bytes": k["spill_bytes"], "stack_bytes": k["stack_bytes"],
                  "static_smem_bytes": k["static_smem_bytes"], "static_instructions": k["static_instructions"], "loops": k["loops"]}
                 for k in out if "registers" in k]
    seen, uniq = set(), []
    for f in functions:
        if f["function"] not in seen:
            seen.add(f["function"])
            uniq.append(f)
    return {"kernels": out, "functions": uniq, "plans": pl, "label": LABEL,
            "note": "grids from csrc/kernels/plan.h (g++ planner); trips by loop role (static/cuda_plans.py); "
                    "one instance per activation and per training/eval epilogue (template arguments); runtime "
                    "branches (vector/scalar staging) resolved where the plan decides them, other forward branches "
                    "counted both ways"}


def cuda_extension(csrc: Optional[str] = None) -> dict:
    """Resources and static instruction mix of every kernel instance in csrc/kernels (nvcc, sm_90)."""
    csrc = csrc or os.path.join(REPO, "csrc")
    if not os.path.isdir(os.path.join(csrc, "kernels")):
        return {"error": f"no {csrc}/kernels (source checkout only)"}
    with tempfile.TemporaryDirectory(prefix="cmk-cuda-") as tmp:
        try:
            compiled = toolchain.compile_cuda_sources(csrc, tmp)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    funcs = []
    for name, c in sorted(compiled.items()):
        f = next((f for f in sass.parse(c.sass) if f.name == name), None)
        mix = f.static_mix() if f else {}
        occ = predict.occupancy(c.resources.registers, c.resources.static_smem, 4)
        funcs.append({"function": name, "source": c.extra.get("source"), "registers": c.resources.registers,
                      "spill_bytes": c.resources.spill_bytes, "stack_bytes": c.resources.stack,
                      "static_smem_bytes": c.resources.static_smem, "static_instructions": mix.get("total"),
                      "static_mix": {k: v for k, v in mix.items() if v}, "loops": [lp.as_dict() for lp in f.loops] if f else [],
                      "blocks_per_sm_at_128_threads": occ.blocks_per_sm})
    return {"functions": funcs, "note": "no predicted time: the launch grid is planned in C++ (csrc/kernels/plan.h) "
                                        "and not captured; resources and static mix only"}


# ------------------------------------------------------------------ the readable table


def format_report(r: dict) -> str:
    w = r["workload"]
    lines = [f"convmixer-kernels inspect: ConvMixer-{w['dim']}/{w['depth']} k{w['kernel_size']} p{w['patch_size']}, "
             f"batch {w['batch']}, {w['image_size']}x{w['image_size']} ({w['grid_size']}x{w['grid_size']} grid), "
             f"{w['dtype']}, {w['layout']}",
             f"*** {LABEL.upper()} *** (sm_90 machine code vs {H200.name} ceilings; times are predictions)", ""]
    head = (f"{'phase':<22}{'kernel':<20}{'grid':>11}{'regs':>5}{'spill':>6}{'smem':>7}{'blk/SM':>7}{'occ':>5}"
            f"{'instr/FMA':>10}{'pred us':>9}{'bound':>8}{'floor us':>9}{'%roof':>6}")
    lines += [head, "-" * len(head)]
    for k in r["kernels"]:
        if k["candidate"]:
            continue
        ph = f"{k['block'][:2]} {k['phase']}"
        grid = "x".join(str(g) for g in k["grid"] if g != 1) or "1"
        if "compile_error" in k:
            lines.append(f"{ph:<22}{k['kernel']:<20}{grid:>11}  COMPILE ERROR: {k['compile_error'][:80]}")
            continue
        ipf = f"{k['instr_per_ffma']:.1f}" if k.get("instr_per_ffma") else "-"
        lines.append(f"{ph:<22}{k['kernel']:<20}{grid:>11}{k['registers']:>5}{k['spill_bytes']:>6}{k['smem_bytes']:>7}"
                     f"{k['blocks_per_sm']:>7}{k['occupancy']:>5.2f}{ipf:>10}{k['predicted_us']:>9.1f}{k['bound']:>8}"
                     f"{k['floor_us']:>9.1f}{k['roofline_pct']:>6.0f}" + ("" if k["loops_matched"] else "  (loops?)"))
    lines += ["", f"{'block':<10}{'phase':<30}{'pred us':>9}{'floor us':>9}{'passes':>8}{'budget':>7}{'eager':>7}",
              "-" * 80]
    for b in r["blocks"]:
        if b.get("backend") == "cuda":
            continue
        ev = b.get("eager_passes_counted")
        lines.append(f"{b['block']:<10}{b['phase']:<30}{b['predicted_us']:>9.1f}{b['floor_us']:>9.1f}"
                     f"{b['passes']:>8.2f}{str(b.get('budget_passes') or '-'):>7}"
                     f"{(f'{ev:.1f}' if ev else '-'):>7}")
    s = r.get("step") or {}
    if s:
        lines += ["", f"training step ({s['what']}): predicted {s['predicted_ms']:.2f} ms, floor {s['floor_ms']:.2f} ms,"
                  f" {s['images_per_s_predicted']:.0f} img/s predicted; DRAM per layer {s['dram_bytes_per_layer'] / 1e9:.2f} GB"
                  f" = {s['dram_vs_eager']:.2f}x eager counted (target <= 0.45x); eager at its roofline "
                  f"{s['eager_roofline_ms']:.2f} ms: fused >= {s['speedup_vs_eager_roofline']:.2f}x eager (a lower bound; "
                  f"target >= 3x)"]
    st = r.get("stack") or {}
    if st:
        lo = st["lowest_memory"]
        lines += [f"fused layer stack ({st['what']}): predicted {st['predicted_ms']:.2f} ms, floor {st['floor_ms']:.2f} ms, "
                  f"{st['images_per_s_predicted']:.0f} img/s predicted ({st['speedup_vs_per_block_fusion']:.2f}x per-block "
                  f"fusion); DRAM per layer {st['passes_per_layer']:.1f} passes = {st['dram_vs_eager']:.2f}x eager "
                  f"(target <= 0.45x); saved per layer {st['saved_per_layer_units']:.2f} tensors = "
                  f"{st['saved_vs_eager']:.2f}x eager (target <= 0.5x); memory='lowest': {lo['saved_per_layer_units']:.2f} "
                  f"tensors = {lo['saved_vs_eager']:.2f}x (target <= 0.3x) for {lo['cost_vs_normal']:.2f}x the time; "
                  f"eval: {st['inference_kernels_per_layer']} kernels per layer"]
    m = r.get("memory") or {}
    if m:
        lines.append(f"saved for backward per layer: fused {m['saved_per_layer_fused_units']:.2f} tensors, eager "
                     f"{m['saved_per_layer_eager_units']:.2f} ({m['peak_ratio']:.2f}x; target <= 0.5x)")
    ce = r.get("cuda_extension")
    if ce and "kernels" in ce:
        lines += ["", f"CUDA extension (csrc/kernels, nvcc sm_90; grids from plan.h), {LABEL}:", head, "-" * len(head)]
        for k in ce["kernels"]:
            ph = f"dw {k['phase']}"
            grid = str(k["grid"][0])
            name = k["kernel"].replace("depthwise_", "").replace("_kernel", "")
            if "error" in k:
                lines.append(f"{ph:<22}{name:<20}{'-':>11}  NOT RUN: {k['error']}")
                continue
            if "compile_error" in k:
                lines.append(f"{ph:<22}{name:<20}{grid:>11}  COMPILE ERROR: {k['compile_error'][:80]}")
                continue
            ipf = f"{k['instr_per_ffma']:.1f}" if k.get("instr_per_ffma") else "-"
            lines.append(f"{ph:<22}{name:<20}{grid:>11}{k['registers']:>5}{k['spill_bytes']:>6}{k['smem_bytes']:>7}"
                         f"{k['blocks_per_sm']:>7}{k['occupancy']:>5.2f}{ipf:>10}{k['predicted_us']:>9.1f}{k['bound']:>8}"
                         f"{k['floor_us']:>9.1f}{k['roofline_pct']:>6.0f}" + ("" if k["loops_matched"] else "  (loops?)"))
        cb = [b for b in r["blocks"] if b.get("backend") == "cuda"]
        if cb:
            lines += ["", f"{'block':<10}{'phase (cuda)':<30}{'pred us':>9}{'floor us':>9}{'passes':>8}{'budget':>7}", "-" * 73]
            for b in cb:
                if b.get("error"):
                    lines.append(f"{b['block']:<10}{b['phase']:<30}  NOT RUN: {b['error']}")
                    continue
                lines.append(f"{b['block']:<10}{b['phase']:<30}{b['predicted_us']:>9.1f}{b['floor_us']:>9.1f}"
                             f"{b['passes']:>8.2f}{str(b.get('budget_passes') or '-'):>7}")
    elif ce:
        if "error" in ce:
            lines.append(f"CUDA extension: not inspected: {ce['error'].splitlines()[0][:200]}")
        else:
            lines += ["", "CUDA extension kernels (nvcc sm_90, resources only):"]
            for f in ce["functions"]:
                lines.append(f"  {f['function'][:70]:<72}{f['registers']:>4} regs {f['spill_bytes']:>4} B spill "
                             f"{f['static_instructions']:>6} instr")
    lines += ["", f"({LABEL}: no GPU ran anything)"]
    return "\n".join(lines)
