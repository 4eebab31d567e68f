"""``profile``: large-kernel depthwise performance, swept over kernel size, shape, dtype and layout.

For every point of the sweep and every provider (eager, torch.compile default and
max-autotune, each fused backend; each in NCHW and channels_last), the depthwise conv
alone and the depthwise block are checked against a float64 reference (precision rule,
at ``--check-batch``) and timed on the GPU with CUDA events (median). Prints a table
(time, GB/s, TFLOP/s, % of roofline, speedup over cuDNN = eager channels_last) and
writes ``profile.json`` and a plot (speedup and % of roofline vs kernel size) into
``--out``. ``--trace`` wraps one run of every provider in torch.profiler and writes a
Chrome trace whose ranges name the provider. Needs a CUDA GPU: without one it says so
and exits with status 2 (no numbers are made up).

The sweep itself is ``bench/bench_harness/sweep.py``, imported only when this runs (from the
source checkout's bench/; an installed wheel without the repository says so in one line).
"""
from __future__ import annotations

import os
import sys

NO_GPU = ("profile needs a CUDA GPU (torch.cuda.is_available() is False): it times kernels with CUDA events, "
          "so there is nothing to measure here. Run it on a GPU machine (scripts/gpu_session.sh profile).")
BASES = ("eager", "compile", "compile-max-autotune", "fused")


def add_arguments(parser) -> None:
    parser.add_argument("--ops", default="dwconv,dw_block",
                        help="dwconv (the conv alone; its fused provider is the fused eval block: "
                             "conv + affine + residual, one kernel) and/or dw_block")
    parser.add_argument("--modes", default="fwd", help="fwd and/or fwd+bwd (training mode)")
    parser.add_argument("--kernel-sizes", default="3-31", help="e.g. 3-31 (odd), 3-31:1 (all), or 3,9,31")
    parser.add_argument("--sizes", default="32", help="feature map H = W, comma-separated")
    parser.add_argument("--channels", default="1536", help="channels, comma-separated")
    parser.add_argument("--batch", default="64", help="batch sizes, comma-separated")
    parser.add_argument("--dtypes", default="bf16", help="bf16, fp16 (autocast) and/or fp32")
    parser.add_argument("--layouts", default="nchw,cl", help="nchw and/or cl (channels_last)")
    parser.add_argument("--providers", default=",".join(BASES),
                        help=f"some of {', '.join(BASES)} ('fused' = every fused backend available on CUDA); "
                             "eager channels_last (cuDNN) is always timed as the baseline")
    parser.add_argument("--check-batch", type=int, default=4, help="batch of the float64 check (0: full batch)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="GPU time spent timing each point (ms)")
    parser.add_argument("--out", default=os.path.join("runs", "profile"), help="folder for profile.json, the plot, "
                        "the trace (default runs/profile)")
    parser.add_argument("--trace", action="store_true", help="also run every provider once under torch.profiler "
                        "and write trace.json (Chrome trace format)")
    parser.add_argument("--trace-kernel-size", type=int, default=9, help="kernel size of the traced run")


def run(args) -> int:
    import torch

    from .bench import import_harness

    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    harness = import_harness("profile")
    if harness is None:
        return 2
    return harness.sweep.run(args)
