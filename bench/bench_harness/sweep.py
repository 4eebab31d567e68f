"""The ``convmixer-kernels profile`` sweep: large-kernel depthwise performance over kernel size,
shape, dtype and layout, every provider checked (precision rule) then timed; a table, a plot
and a trace. ``convmixer_kernels/commands/profile.py`` holds its arguments and imports this
only when run.

The sweep calls ``workloads.run_case`` and ``results.run_metadata`` through their modules,
so tests can replace the GPU parts.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch

from convmixer_kernels.backends import BackendUnavailableError
from convmixer_kernels.commands.profile import BASES

from . import results as _results
from . import workloads as _workloads
from .results import ResultsFile
from .timing import gpu_range
from .workloads import CUDNN, NotApplicable, Workload, fused_providers

def _ints(text: str) -> List[int]:
    """"3,5,9" or "3-31" (odd kernel sizes from 3 to 31) or "3-31:1" (every size)."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            span, _, step = part.partition(":")
            lo, hi = (int(v) for v in span.split("-"))
            out += list(range(lo, hi + 1, int(step) if step else 2))
        elif part:
            out.append(int(part))
    return out


def _words(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def providers(bases: List[str], layouts: List[str]) -> List[str]:
    names: List[str] = []
    for base in bases:
        if base not in BASES:
            raise ValueError(f"unknown provider {base!r}; choose from {', '.join(BASES)}")
        for layout in layouts:
            if layout not in ("nchw", "cl"):
                raise ValueError(f"unknown layout {layout!r}; choose nchw or cl")
            suffix = "-cl" if layout == "cl" else ""
            names += fused_providers("cuda", (suffix,)) if base == "fused" else [base + suffix]
    return [CUDNN] + [n for n in names if n != CUDNN]  # the baseline first


def format_table(records: List[dict]) -> str:
    """One line per record, speedup over cuDNN (eager channels_last) of the same point.

    A provider marked ``*`` computes more than the workload (its record's ``computes``,
    e.g. the conv alone's fused provider, the fused eval block); a footnote says what.
    """
    base = _baselines(records)
    head = (f"{'op':<9}{'mode':<8}{'dtype':<6}{'N':>4}{'C':>6}{'HxW':>7}{'k':>4}  {'provider':<26}"
            f"{'ms':>9}{'GB/s':>8}{'TFLOP/s':>9}{'%roof':>7}{'x cuDNN':>9}")
    lines = [head, "-" * len(head)] + [format_row(r, base) for r in records]
    lines += [f"* {c}" for c in sorted({r["computes"] for r in records if r.get("computes")})]
    return "\n".join(lines)


def _baselines(records: List[dict]) -> Dict[tuple, float]:
    return {_point(r): r["median_ms"] for r in records if r["provider"] == "eager-cl" and "median_ms" in r}


def format_row(r: dict, base: Dict[tuple, float]) -> str:
    provider = r["provider"] + ("*" if r.get("computes") else "")
    pre = (f"{r['workload']:<9}{r['mode']:<8}{r['dtype']:<6}{r['batch']:>4}{r['dim']:>6}"
           f"{str(r['size']) + 'x' + str(r['size']):>7}{r['kernel_size']:>4}  {provider:<26}")
    if "median_ms" not in r:
        return pre + f"  {r['status']}"
    b = base.get(_point(r))
    speed = f"{b / r['median_ms']:.2f}x" if b else "-"
    return pre + f"{r['median_ms']:9.3f}{r['gbps']:8.0f}{r['tflops']:9.2f}{r['roofline_pct']:7.1f}{speed:>9}"


def _point(r: dict) -> tuple:
    return (r["workload"], r["mode"], r["dtype"], r["batch"], r["dim"], r["size"], r["kernel_size"])


def plot(records: List[dict], path: str) -> str:
    """Speedup over cuDNN and % of roofline vs kernel size, one line per provider; returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    timed = [r for r in records if "median_ms" in r]
    base = {_point(r): r["median_ms"] for r in timed if r["provider"] == "eager-cl"}
    panels = sorted({(r["workload"], r["mode"], r["dtype"], r["batch"], r["dim"], r["size"]) for r in timed})
    if not panels:
        return "nothing was timed: no plot"
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        sel = [r for r in timed if (r["workload"], r["mode"], r["dtype"], r["batch"], r["dim"], r["size"]) == panel]
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["kernel_size"], r) for r in sel if r["provider"] == prov)
            ks = [k for k, _ in pts]
            label = prov + "".join(sorted({f" ({r['computes']})" for _, r in pts if r.get("computes")}))
            axes[row][0].plot(ks, [base.get(_point(r), float("nan")) / r["median_ms"] for _, r in pts], "o-",
                              label=label)
            axes[row][1].plot(ks, [r["roofline_pct"] for _, r in pts], "o-", label=label)
        op, mode, dtype, n, c, h = panel
        title = f"{op} {mode}, {dtype}, N={n} C={c} {h}x{h}"
        axes[row][0].set(title=f"{title}: speedup over cuDNN", xlabel="kernel size", ylabel="x eager channels_last")
        axes[row][0].set_yscale("log")
        axes[row][1].set(title=f"{title}: % of roofline", xlabel="kernel size", ylabel="% of floor (H100 numbers)")
        for ax in axes[row]:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def run(args) -> int:
    """The sweep of ``convmixer-kernels profile`` (its arguments); the exit status (1: a provider failed)."""
    os.environ["CONVMIXER_KERNELS_STRICT"] = "1"  # a fused provider never silently times the reference
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    names = providers(_words(args.providers), _words(args.layouts))
    os.makedirs(args.out, exist_ok=True)
    results = ResultsFile(os.path.join(args.out, "profile.json"), "profile", _results.run_metadata())
    records = results.records
    traced: Dict[str, object] = {}
    failures = 0
    refs: dict = {}
    points = [(op, mode, dtype, n, c, h, k) for op in _words(args.ops) for mode in _words(args.modes)
              for dtype in _words(args.dtypes) for n in _ints(args.batch) for c in _ints(args.channels)
              for h in _ints(args.sizes) for k in _ints(args.kernel_sizes)]
    trace_point = next((p for p in points if p[-1] == args.trace_kernel_size), points[0] if points else None)
    print(f"profile: {len(points)} points x {len(names)} providers ({', '.join(names)}) on "
          f"{torch.cuda.get_device_name()}", flush=True)
    for point in points:
        op, mode, dtype, n, c, h, k = point
        w = Workload(op, mode, c, n, h, k, dtype=dtype)
        for name in names:
            row = {"workload": op, "mode": mode, "dtype": dtype, "batch": n, "dim": c, "size": h,
                   "kernel_size": k, "provider": name}
            try:
                res = _workloads.run_case(w, name, "cuda", check_batch=min(args.check_batch, n) or None,
                                          rep_ms=args.rep_ms, refs=refs)
                row = res.record
                if args.trace and point == trace_point:
                    traced[name] = res.step
            except NotApplicable as e:
                row["status"] = f"n/a: {e}"
            except (AssertionError, BackendUnavailableError) as e:  # the precision rule, or a refused fallback
                failures += 1
                row["status"] = f"FAILED: {str(e).splitlines()[0]}"
                print(str(e), file=sys.stderr)
            except Exception as e:  # a provider that crashes (a compile error, a kernel launch): note it, go on
                failures += 1
                row["status"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"{name} at {point}: {type(e).__name__}: {e}", file=sys.stderr)
            results.add(row)  # rewrites profile.json: a run cut short keeps what it measured
            print(format_row(row, _baselines(records)), flush=True)
        torch.cuda.empty_cache()
    table = format_table(records)
    print("\n" + table)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(table + "\n")
    print(plot(records, os.path.join(args.out, "profile.png")))
    if args.trace and traced:
        trace_path = os.path.join(args.out, "trace.json")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for name, step in traced.items():
                for _ in range(3):
                    with gpu_range(f"profile {name} k{trace_point[-1]}"):
                        step()
        prof.export_chrome_trace(trace_path)
        try:
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
        except Exception:  # older torch names the column cuda_time_total
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        print(f"trace: {trace_path} (open in chrome://tracing or https://ui.perfetto.dev)")
    print(f"results: {os.path.join(args.out, 'profile.json')}")
    return 1 if failures else 0
