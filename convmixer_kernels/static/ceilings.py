"""The one table of GPU ceilings every static prediction is made against.

H200 (sm_90, the GPU this project may be lent). Figures: design.md section 7 and gpu.md
(4.3 TB/s copy and 788 TFLOP/s bf16 GEMM measured on such a machine; the rest datasheet or
reported). Replace them here with measured figures once a GPU run exists; nothing else in the
package holds a ceiling.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Ceilings:
    name: str = "H200 (sm_90)"
    sms: int = 132
    clock_hz: float = 1.98e9
    dram_bytes_per_s: float = 4.3e12  # device copy, measured
    tensor_bf16_flops: float = 788e12  # dense bf16 GEMM, measured
    fma_fp32_flops: float = 67e12  # fp32 FMA (2 FLOP per FMA), datasheet
    l2_bytes: int = 60 * 2 ** 20
    smem_per_sm: int = 228 * 1024  # bytes, of which 1 KB per block is reserved by the driver
    smem_per_block_max: int = 227 * 1024
    smem_reserved_per_block: int = 1024
    regs_per_sm: int = 64 * 1024
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_regs_per_thread: int = 255
    threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    schedulers_per_sm: int = 4  # one warp-instruction issued per scheduler per clock
    warps_to_hide_latency: int = 4  # per scheduler: see predict.occupancy_factor
    capability: int = 90

    @property
    def issue_rate(self) -> float:
        """Warp-instructions per second, whole GPU."""
        return self.schedulers_per_sm * self.sms * self.clock_hz

    def as_dict(self) -> dict:
        return asdict(self)


H200 = Ceilings()
