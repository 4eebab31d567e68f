"""Host overhead of the fused modules: µs per forward call on the CPU, torch backend, small tensors.

    python bench/host_overhead.py                       # table + bench/results/host-overhead-cpu.json
    python bench/host_overhead.py --cprofile FusedDepthwiseBlock:train   # where a fused call's time goes

With tensors this small (default N=2, C=8, 8x8) the arithmetic is negligible, so the time per
call is what Python and the dispatcher spend around it: for a fused module, its structure
checks, the backend verdict (cached per module, see ``ops/dispatch.py``) and the op's front
function; for the reference module (``.to_reference()``, the same parameters, unfused), the
plain ``nn.Module`` calls. The issue's target: fused within 1.2x of the reference's host time.

Method: one thread; for each module pair, ``--repeats`` samples, each the mean over ``--calls``
back-to-back forward calls; fused and reference samples interleaved (their order alternating per
repeat) so drift and neighbours' load hit both alike; medians reported, with the p20-p80 spread
and the fastest sample of each (less sensitive to a loaded machine).
Modes: "train" (training mode, grad enabled: what a training step pays) and "eval" (eval mode
under ``torch.no_grad()``: inference). This is a script, not a timed test.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time

import torch

from convmixer_kernels.modules import FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_harness.results import _git, run_metadata  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "host-overhead-cpu.json")
MODULES = {
    "FusedDepthwiseBlock": lambda c, k: FusedDepthwiseBlock(c, k, backend="torch"),
    "FusedPointwiseBlock": lambda c, k: FusedPointwiseBlock(c, backend="torch"),
    "FusedConvMixerLayer": lambda c, k: FusedConvMixerLayer(c, k, backend="torch"),
}
MODES = ("train", "eval")


def make_pair(name: str, mode: str, c: int, k: int):
    torch.manual_seed(0)
    fused = MODULES[name](c, k)
    reference = fused.to_reference()  # shares the parameters: same work, unfused
    for m in (fused, reference):
        m.train(mode == "train")
    return fused, reference


def sample(module, x, calls: int, grad: bool) -> float:
    """Mean µs per call over ``calls`` back-to-back forward calls."""
    with torch.set_grad_enabled(grad):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            module(x)
        t1 = time.perf_counter_ns()
    return (t1 - t0) / calls / 1e3


def measure(name: str, mode: str, args) -> dict:
    fused, reference = make_pair(name, mode, args.channels, args.kernel_size)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    grad = mode == "train"
    for m in (fused, reference):  # warm-up: first-call caches (the fused verdict) and allocator
        sample(m, x, args.calls, grad)
    got = {"fused": [], "reference": []}
    for i in range(args.repeats):
        order = (("fused", fused), ("reference", reference)) if i % 2 == 0 else \
            (("reference", reference), ("fused", fused))
        for label, m in order:
            got[label].append(sample(m, x, args.calls, grad))
    assert fused.last_backend == "torch", f"{name} ran {fused.last_backend!r}, not the torch backend"
    row = {"module": name, "mode": mode}
    for label, times in got.items():
        q = statistics.quantiles(times, n=5)
        row[f"{label}_us"] = statistics.median(times)
        row[f"{label}_p20_us"], row[f"{label}_p80_us"] = q[0], q[3]
        row[f"{label}_min_us"] = min(times)  # the least disturbed sample: a check on a loaded machine
    row["ratio"] = row["fused_us"] / row["reference_us"]
    row["ratio_of_minima"] = row["fused_min_us"] / row["reference_min_us"]
    return row


def cprofile(spec: str, args) -> None:
    name, _, mode = spec.partition(":")
    fused, _ = make_pair(name, mode or "train", args.channels, args.kernel_size)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    grad = (mode or "train") == "train"
    sample(fused, x, args.calls, grad)
    prof = cProfile.Profile()
    prof.enable()
    sample(fused, x, args.calls * args.repeats, grad)
    prof.disable()
    print(f"cProfile of {args.calls * args.repeats} calls of {name} ({mode or 'train'}), by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--size", type=int, default=8, help="H = W")
    parser.add_argument("--kernel-size", type=int, default=3, help="3: the conv's own CPU time stays small")
    parser.add_argument("--calls", type=int, default=50, help="forward calls per sample")
    parser.add_argument("--repeats", type=int, default=200, help="samples per module (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    parser.add_argument("--out", default=OUT, help="results JSON ('' to write none)")
    parser.add_argument("--cprofile", metavar="MODULE:MODE", help="profile one fused module instead of timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.pop("CONVMIXER_KERNELS_BACKEND", None)
    if args.cprofile:
        cprofile(args.cprofile, args)
        return 0
    rows = [measure(name, mode, args) for name in MODULES for mode in MODES]
    head = (f"{'module':<22}{'mode':<7}{'fused us':>10}{'reference us':>14}{'ratio':>8}  {'fused p20-p80':>15}"
            f"{'min: fused':>12}{'ref':>8}{'ratio':>8}")
    print(f"host time per forward call, CPU, torch backend, x {args.batch}x{args.channels}x{args.size}x{args.size}, "
          f"k={args.kernel_size}, median of {args.repeats} x {args.calls} calls, {args.threads} thread(s)")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['module']:<22}{r['mode']:<7}{r['fused_us']:10.1f}{r['reference_us']:14.1f}{r['ratio']:7.2f}x"
              f"  {r['fused_p20_us']:7.1f}-{r['fused_p80_us']:<7.1f}"
              f"{r['fused_min_us']:12.1f}{r['reference_min_us']:8.1f}"
              f"{r['ratio_of_minima']:7.2f}x")
    target = 1.2
    print(f"target: fused within {target}x of the reference: "
          + ("met everywhere" if all(r["ratio"] <= target for r in rows)
             else "missed for " + ", ".join(f"{r['module']} {r['mode']}" for r in rows if r["ratio"] > target)))
    if args.out:
        meta = dict(run_metadata(), machine=machine(), device="cpu", backend="torch")
        meta.pop("roofline", None)
        # what was measured is the working tree: the package files that differ from the commit
        status = _git("status", "--porcelain", "--", "convmixer_kernels") or ""
        meta["uncommitted_package_files"] = sorted(line.split(None, 1)[-1] for line in status.splitlines())
        config = {k: getattr(args, k) for k in ("batch", "channels", "size", "kernel_size", "calls", "repeats",
                                                "threads")}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"schema": "convmixer-kernels-host-overhead/1", "meta": meta, "config": config,
                       "target_ratio": target, "results": rows}, f, indent=1)
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
