"""``bench``: run the benchmark suite, ``pytest bench/``, passing any further arguments to pytest.

Example: ``convmixer-kernels bench -- -k "dw_block and 1536" --bench-providers eager,fused-triton``.
The suite needs a CUDA GPU and a source checkout (bench/ and its harness bench/bench_harness/
are not installed with the package); results land in bench/results/ (``--bench-out DIR`` to change) and
``python bench/summarize.py`` tabulates them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Optional

NO_GPU = ("bench needs a CUDA GPU (torch.cuda.is_available() is False): the benchmarks time kernels with CUDA "
          "events, so nothing is measured here. Run it on a GPU machine (scripts/gpu_session.sh bench).")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(REPO, "bench")
HARNESS = "bench_harness"  # bench/bench_harness/: workloads, roofline, timing, results, sweep


def import_harness(command: str, bench_dir: str = BENCH_DIR) -> Optional[ModuleType]:
    """The benchmark harness from the source checkout's bench/ (put on sys.path), with its modules
    loaded; None after a one-line error when bench/ is not there (an installed wheel)."""
    if not os.path.isfile(os.path.join(bench_dir, HARNESS, "__init__.py")):
        print(f"{command} needs the benchmark harness {os.path.join(bench_dir, HARNESS)}, which lives in the source "
              "checkout (not in an installed wheel): git clone the repository and run it from there",
              file=sys.stderr)
        return None
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    harness = importlib.import_module(HARNESS)
    for name in ("workloads", "roofline", "timing", "results", "sweep"):
        importlib.import_module(f"{HARNESS}.{name}")
    return harness


def add_arguments(parser) -> None:
    parser.add_argument("--bench-dir", default=BENCH_DIR,
                        help="the benchmark suite (default: bench/ of this source checkout)")
    parser.add_argument("--dry-run", action="store_true", help="print the pytest command instead of running it")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="arguments for pytest, after '--' (e.g. -- -k dw_block --bench-configs 1536/20-k9-p7)")


def command(args) -> list:
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return [sys.executable, "-m", "pytest", args.bench_dir, "-p", "no:cacheprovider", *extra]


def run(args) -> int:
    import torch

    cmd = command(args)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if not os.path.isdir(args.bench_dir):
        print(f"no benchmark suite at {args.bench_dir}: bench/ lives in the source checkout "
              "(git clone the repository, or pass --bench-dir)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    return subprocess.call(cmd, cwd=os.path.dirname(os.path.abspath(args.bench_dir)))
