"""``inspect``: static performance evidence, no GPU needed (static prediction, not a measurement).

Runs the package's own launchers on meta tensors with an sm_90 policy, compiles every launch ahead
of time for sm_90a (Triton) and the CUDA extension's kernels with nvcc, reads ``ptxas -v`` and the
SASS, and predicts each kernel's time against the H200 ceilings of ``convmixer_kernels.static.ceilings``.
Prints a table; ``--json FILE`` writes every figure with the tool versions and the commit.
"""
from __future__ import annotations

import json
import sys

PAPER = {  # name -> (dim, depth, kernel, patch, image, activation)
    "1536/20-k9-p7": (1536, 20, 9, 7, 224, "gelu"), "768/32-k7-p7": (768, 32, 7, 7, 224, "relu"),
    "1024/20-k9-p14": (1024, 20, 9, 14, 224, "gelu"), "256/8-k5-p2": (256, 8, 5, 2, 32, "gelu"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--config", choices=sorted(PAPER), default=None,
                        help="a paper configuration (sets dim, depth, kernel, patch, image size, activation)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=7)
    parser.add_argument("--kernel-size", type=int, default=9)
    parser.add_argument("--activation", default="gelu", choices=["gelu", "gelu_tanh", "relu"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    parser.add_argument("--backend", default="all", choices=["all", "triton", "cuda"],
                        help="whose kernels to inspect (cuda: the extension's launches planned by csrc/kernels/plan.h through a g++-built "
                             "planner, their instances through nvcc; needs g++, nvcc and cuobjdump)")
    parser.add_argument("--all-configs", action="store_true", help="also compile every autotune candidate")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every figure as JSON ('-': stdout)")


def run(args) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # kernels are decorated for the interpreter at import: compile in a fresh process without it
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "convmixer_kernels", "inspect", *_argv(args)], env=env)
    from ..static import report, toolchain

    reason = toolchain.missing_tools()
    if reason:
        print(f"inspect cannot run here: {reason}", file=sys.stderr)
        return 2
    w = report.Workload(args.dim, args.depth, args.batch, args.image_size, args.patch_size, args.kernel_size,
                        args.dtype, args.layout, args.activation)
    if args.config:
        d, depth, k, p, img, act = PAPER[args.config]
        w = report.Workload(d, depth, args.batch, img, p, k, args.dtype, args.layout, act, args.config)
    backends = ("triton", "cuda") if args.backend == "all" else (args.backend,)
    result = report.inspect_workload(w, backends=backends, all_configs=args.all_configs,
                                     progress=lambda m: print(f"  compiling {m}", file=sys.stderr))
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1, default=str)
        return 0
    print(report.format_report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"json: {args.json}")
    return 0


def _argv(args) -> list:
    out = []
    for name in ("config", "dim", "depth", "batch", "image_size", "patch_size", "kernel_size", "activation", "dtype",
                 "layout", "backend", "json"):
        v = getattr(args, name)
        if v is not None:
            out += [f"--{name.replace('_', '-')}", str(v)]
    return out + (["--all-configs"] if args.all_configs else [])
