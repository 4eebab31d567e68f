"""The roofline and the traffic/FLOP model of every workload (design.md sections 4 and 7).

* ``Roofline``: the peak rates the targets are stated for (a lent H100 SXM).
* ``Cost``: one call's parts. Bytes are the *fused per-module budget* of design.md
  section 4 (so "achieved GB/s" of any provider is comparable, and a fused path at 100%
  moves exactly its budget at copy bandwidth); FLOPs are the convolutions'
  multiply-adds x 2. The floor of a workload is the sum over its parts of
  max(bytes / bandwidth, GEMM FLOPs / GEMM peak + direct FLOPs / FMA peak).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass(frozen=True)
class Roofline:
    """Peak rates of the GPU the targets are stated for (design.md section 7: lent H100 SXM)."""

    name: str = "H100 SXM (design.md section 7)"
    bandwidth: float = 3.0e12  # bytes/s, measured copy bandwidth
    gemm_half: float = 790e12  # FLOP/s, bf16/fp16 tensor-core GEMM
    fma_fp32: float = 67e12  # FLOP/s, fp32 FMA (spec): depthwise convs and fp32 GEMMs without tf32

    def gemm_peak(self, elem_bytes: int) -> float:
        return self.gemm_half if elem_bytes == 2 else self.fma_fp32

    def as_dict(self) -> dict:
        return {"name": self.name, "bandwidth_GBps": self.bandwidth / 1e9, "gemm_half_TFLOPs": self.gemm_half / 1e12,
                "fma_fp32_TFLOPs": self.fma_fp32 / 1e12}


H100 = Roofline()


@dataclass
class Part:
    name: str
    bytes: float
    gemm_flops: float = 0.0  # tensor-core work (1x1 convs, the patch conv, the head)
    direct_flops: float = 0.0  # CUDA-core work (the depthwise conv)

    def floor_s(self, roof: Roofline, elem_bytes: int) -> float:
        return max(self.bytes / roof.bandwidth,
                   self.gemm_flops / roof.gemm_peak(elem_bytes) + self.direct_flops / roof.fma_fp32)


@dataclass
class Cost:
    """Traffic and work of one call of a workload, in parts that run as separate kernels."""

    elem_bytes: int
    parts: List[Part] = field(default_factory=list)

    def add(self, name: str, bytes: float, gemm_flops: float = 0.0, direct_flops: float = 0.0) -> "Cost":
        self.parts.append(Part(name, bytes, gemm_flops, direct_flops))
        return self

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def flops(self) -> float:
        return sum(p.gemm_flops + p.direct_flops for p in self.parts)

    def floor_s(self, roof: Roofline = H100) -> float:
        return sum(p.floor_s(roof, self.elem_bytes) for p in self.parts)

    def metrics(self, seconds: float, roof: Roofline = H100) -> Dict[str, float]:
        """GB/s and TFLOP/s achieved at ``seconds`` per call, and the % of the floor reached."""
        return {"bytes": self.bytes, "flops": self.flops, "gbps": self.bytes / seconds / 1e9,
                "tflops": self.flops / seconds / 1e12, "floor_ms": self.floor_s(roof) * 1e3,
                "roofline_pct": 100.0 * self.floor_s(roof) / seconds}


# Fused per-module budgets (design.md section 4), in full reads/writes of one activation.
UNITS = {
    ("dwconv", "fwd"): 2, ("dwconv", "bwd"): 3,  # x -> y; dy, x -> dx (+ dw partials)
    ("dw_block", "fwd"): 5, ("dw_block", "fwd_eval"): 2, ("dw_block", "bwd"): 6,
    ("pw_block", "fwd"): 4, ("pw_block", "fwd_eval"): 2, ("pw_block", "bwd"): 9,
    ("stem", "fwd"): 4, ("stem", "fwd_eval"): 2, ("stem", "bwd"): 5,  # no dx for the image
}


def block_cost(op: str, n: int, c: int, h: int, w: int, k: int, elem_bytes: int, *, training: bool,
               backward: bool) -> Cost:
    """Cost of one depthwise conv ("dwconv"), depthwise block ("dw_block") or pointwise block ("pw_block")."""
    m = n * h * w
    unit = m * c * elem_bytes
    cost = Cost(elem_bytes)
    gemm = 2.0 * m * c * c if op == "pw_block" else 0.0
    direct = 2.0 * m * c * k * k if op in ("dwconv", "dw_block") else 0.0
    fwd_key = "fwd" if training or op == "dwconv" else "fwd_eval"
    cost.add(f"{op} fwd", UNITS[(op, fwd_key)] * unit, gemm, direct)
    if backward:  # dx and dW: twice the forward's work
        cost.add(f"{op} bwd", UNITS[(op, "bwd")] * unit, 2 * gemm, 2 * direct)
    return cost


def convmixer_cost(dim: int, depth: int, kernel_size: int, patch_size: int, image_size: int, batch: int,
                   elem_bytes: int, n_params: int, *, training: bool, in_chans: int = 3,
                   n_classes: int = 1000) -> Cost:
    """Cost of a ConvMixer forward (inference) or training step (forward, backward, AdamW step)."""
    g = image_size // patch_size
    m = batch * g * g
    unit = m * dim * elem_bytes
    image = batch * in_chans * image_size * image_size * 4.0  # the user's float32 images
    stem_gemm = 2.0 * m * in_chans * patch_size ** 2 * dim
    cost = Cost(elem_bytes)
    cost.add("stem fwd", UNITS[("stem", "fwd" if training else "fwd_eval")] * unit + image, stem_gemm)
    for op in ("dw_block", "pw_block"):
        per = block_cost(op, batch, dim, g, g, kernel_size, elem_bytes, training=training, backward=training)
        for p in per.parts:
            cost.add(p.name + f" x{depth}", depth * p.bytes, depth * p.gemm_flops, depth * p.direct_flops)
    cost.add("pool + head", unit + 2.0 * batch * dim * n_classes, 2.0 * batch * dim * n_classes)
    if training:
        cost.add("stem bwd", UNITS[("stem", "bwd")] * unit + image, 2 * stem_gemm)
        cost.add("head bwd", unit, 4.0 * batch * dim * n_classes)
        cost.add("AdamW step", 28.0 * n_params)  # fp32 p, g, m, v read; p, m, v written
    return cost
