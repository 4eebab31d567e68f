"""The CI budget guard: the default launches at one paper shape against a committed static JSON.

Fails (naming the kernel) when a kernel's predicted time is worse than committed by more than
``tolerance``, when it spills more than committed (new spills), when its shared memory exceeds the
per-block limit, when it no longer compiles, or when a committed kernel disappeared / a new one
appeared without the JSON being regenerated (``python -m convmixer_kernels inspect --json ...``).
Static prediction, not a measurement.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List

from .ceilings import H200


def _all_kernels(report: dict) -> List[dict]:
    """The Triton launches and the CUDA extension's (when the report has them)."""
    return list(report.get("kernels") or []) + list((report.get("cuda_extension") or {}).get("kernels") or [])


def _index(kernels: List[dict]) -> Dict[tuple, dict]:
    seen: Counter = Counter()
    out = {}
    for k in kernels:
        if k.get("candidate"):
            continue
        base = (k.get("backend", "triton"), k["block"], k["phase"], k["kernel"])
        out[base + (seen[base],)] = k
        seen[base] += 1
    return out


def _name(key: tuple) -> str:
    backend, block, phase, kernel, i = key
    return f"{backend} {block} {phase}: {kernel}" + (f" #{i + 1}" if i else "")


def compare(current: dict, committed: dict, tolerance: float = 0.10) -> List[str]:
    problems = []
    cur, ref = _index(_all_kernels(current)), _index(_all_kernels(committed))
    for key, k in cur.items():
        if "compile_error" in k:
            problems.append(f"{_name(key)} does not compile for sm_90: {k['compile_error'][:200]}")
            continue
        if k.get("error"):  # the planner refuses the shape: nothing to compare
            continue
        if k["smem_bytes"] > H200.smem_per_block_max:
            problems.append(f"{_name(key)} needs {k['smem_bytes']} B of shared memory (> {H200.smem_per_block_max})")
        r = ref.get(key)
        if r is None:
            problems.append(f"{_name(key)} is new: regenerate the committed static JSON")
            continue
        if r.get("predicted_us") is None or k.get("predicted_us") is None:
            continue
        if k["predicted_us"] > r["predicted_us"] * (1 + tolerance):
            problems.append(f"{_name(key)} predicted {k['predicted_us']:.1f} us vs {r['predicted_us']:.1f} us "
                            f"committed (+{100 * (k['predicted_us'] / r['predicted_us'] - 1):.0f}% > "
                            f"{100 * tolerance:.0f}%)")
        if k["spill_bytes"] > r.get("spill_bytes", 0):
            problems.append(f"{_name(key)} spills {k['spill_bytes']} B (committed: {r.get('spill_bytes', 0)} B)")
    for key in ref:
        if key not in cur:
            problems.append(f"{_name(key)} is gone: regenerate the committed static JSON")
    return problems
