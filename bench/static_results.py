"""Regenerate the committed static predictions in bench/results/ (static sm_90 evidence, no GPU needed).

    python bench/static_results.py            # every paper configuration and the DW k sweep
    python bench/static_results.py --only 1536/20-k9-p7

Each file is what ``convmixer-kernels inspect --backend all --json`` writes for one paper configuration
(Triton and the CUDA extension; the CI guard reads the 1536/20 file), plus the depthwise block on
both backends at k = 3..31 on the 1536-channel 32x32 grid. Every figure is a static prediction, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIGS = ("1536/20-k9-p7", "768/32-k7-p7", "1024/20-k9-p14", "256/8-k5-p2")
SWEEP = range(3, 32, 2)


def _name(config: str) -> str:
    return "static-sm90-" + config.replace("/", "-") + ".json"


def paper_config(config: str) -> None:
    out = os.path.join(RESULTS, _name(config))
    subprocess.run([sys.executable, "-m", "convmixer_kernels", "inspect", "--config", config, "--backend", "all",
                    "--json", out], check=True, env=_env(), stdout=subprocess.DEVNULL)
    print(f"wrote {out}")


def k_sweep() -> None:
    from convmixer_kernels.static import launches, report

    rows = []
    for k in SWEEP:
        w = report.Workload(kernel_size=k)
        shape = w.shape()
        cache: dict = {}
        kernels = [dict(report.kernel_record(launch, cache), backend="triton")
                   for launch in launches.capture("dw_block", shape)]
        eager = {"dw_block": report.traffic.eager_block_traffic("dw_block", shape)}
        blocks = [dict(b, backend="triton") for b in report.block_summaries(kernels, shape, eager)]
        cuda = report.cuda_launches(w, shape)
        blocks += report.cuda_block_summaries(cuda.get("kernels", []), shape, eager)
        rows.append({"kernel_size": k, "kernels": kernels, "cuda_kernels": cuda.get("kernels", []),
                     "cuda_error": cuda.get("error"), "blocks": blocks})
        print(f"  k={k}", file=sys.stderr)
    result = {"schema": "convmixer-kernels-static-sweep/1", "meta": report.meta(),
              "workload": {"dim": 1536, "batch": 64, "grid_size": 32, "dtype": "bf16", "layout": "channels_last",
                           "what": "depthwise block, k sweep 3..31"}, "sweep": rows}
    out = os.path.join(RESULTS, "static-sm90-dw-k-sweep.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}")


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=CONFIGS + ("sweep",), help="regenerate one file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return subprocess.call([sys.executable, __file__] + (argv or sys.argv[1:]), env=_env())
    for config in CONFIGS:
        if args.only in (None, config):
            paper_config(config)
    if args.only in (None, "sweep"):
        k_sweep()
    return 0


if __name__ == "__main__":
    sys.exit(main())
