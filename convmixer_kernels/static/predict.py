"""Predicted time per kernel: the largest of four bounds against ``ceilings.H200``.

* issue-bound: warp-instructions of the busiest SM (programs spread evenly: ceil(programs / SMs)
  of them) over schedulers x clock, divided by the **occupancy factor**
  f = min(1, resident warps per scheduler / 4). A scheduler issues one warp-instruction per clock
  only while it has an eligible warp; with the ~4-6 cycle dependent-issue latency of ALU and
  shared-memory results, 4 resident warps per scheduler are taken as enough to issue every clock,
  fewer scale the rate down linearly (1 warp per scheduler: a quarter of the rate);
* FMA-bound: issued FFMA (and HFMA2 at twice the rate) x 32 lanes x 2 FLOP over the fp32 FMA peak;
* tensor-bound: the kernel's useful tensor-core FLOPs over the bf16 dense peak, times
  ceil(waves) / waves: blocks run in waves of (SMs x resident blocks per SM), and a partly filled
  last wave leaves tensor cores idle (288 blocks on 264 slots take two full waves' time);
* DRAM-bound: the bytes the kernel must move (``trips.Plan`` reads + writes) over copy bandwidth.

The floor is max(DRAM-bound, useful FMAs / FMA peak, tensor-bound); % of roofline = floor / predicted.
Static prediction, not a measurement: latency chains, cache misses and launch overhead are not modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

from .ceilings import H200, Ceilings


@dataclass
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float  # resident warps / max warps
    factor: float  # the issue-rate factor above
    limiter: str


def occupancy(registers: int, smem: int, num_warps: int, ceil: Ceilings = H200) -> Occupancy:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / ceil.reg_alloc_unit) * ceil.reg_alloc_unit
    limits = {
        "registers": ceil.regs_per_sm // (regs_per_warp * num_warps),
        "threads": ceil.threads_per_sm // (32 * num_warps),
        "blocks": ceil.max_blocks_per_sm,
    }
    if smem > 0:
        limits["shared memory"] = ceil.smem_per_sm // (smem + ceil.smem_reserved_per_block)
    limiter = min(limits, key=limits.get)
    blocks = max(limits[limiter], 0)
    warps = blocks * num_warps
    per_sched = warps / ceil.schedulers_per_sm
    return Occupancy(blocks, warps, warps / (ceil.threads_per_sm // 32),
                     min(1.0, per_sched / ceil.warps_to_hide_latency), limiter)


def bounds(dyn_per_warp: Dict[str, float], num_warps: int, programs: int, occ: Occupancy, fma: float,
           mma_flops: float, dram_bytes: float, ceil: Ceilings = H200) -> dict:
    """All times in microseconds."""
    per_program = dyn_per_warp.get("total", 0) * num_warps
    busiest = math.ceil(programs / ceil.sms) if programs else 0
    factor = occ.factor if occ.blocks_per_sm > 0 else float("nan")
    issue = per_program * busiest / (ceil.schedulers_per_sm * ceil.clock_hz * factor) if per_program else 0.0
    ffma = (dyn_per_warp.get("FFMA", 0) + 0.5 * dyn_per_warp.get("HFMA2", 0)) * num_warps * programs
    waves = programs / (ceil.sms * occ.blocks_per_sm) if occ.blocks_per_sm else float("inf")
    tail = math.ceil(waves) / waves if 0 < waves < float("inf") else 1.0
    t = {
        "issue_us": issue * 1e6,
        "fma_us": ffma * 32 * 2 / ceil.fma_fp32_flops * 1e6,
        "tensor_us": mma_flops / ceil.tensor_bf16_flops * 1e6 * tail,
        "dram_us": dram_bytes / ceil.dram_bytes_per_s * 1e6,
    }
    bound = max(t, key=t.get)
    predicted = t[bound]
    floor = max(t["dram_us"], 2 * fma / ceil.fma_fp32_flops * 1e6, mma_flops / ceil.tensor_bf16_flops * 1e6)
    return dict(t, predicted_us=predicted, bound=bound.replace("_us", ""), floor_us=floor,
                roofline_pct=100.0 * floor / predicted if predicted > 0 else 0.0, waves=waves,
                warp_instructions=per_program * programs)
