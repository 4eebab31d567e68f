"""Launch-configuration policy shared by the Triton ops: when a kernel may autotune.

Results are reproducible within a process whatever happens (fixed-order reductions and
a per-shape cache of the chosen configuration). Across processes, autotuning may pick
other tiles and so change the low bits of BatchNorm statistics; deterministic mode
(``CONVMIXER_KERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``)
therefore uses each op's fixed default configuration, as does
``CONVMIXER_KERNELS_AUTOTUNE=0`` and the Triton interpreter.
"""
import os

import torch

from ..backends import triton_interpreting

ENV_DETERMINISTIC = "CONVMIXER_KERNELS_DETERMINISTIC"
ENV_AUTOTUNE = "CONVMIXER_KERNELS_AUTOTUNE"


def deterministic() -> bool:
    return os.environ.get(ENV_DETERMINISTIC, "0") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


def autotune_enabled() -> bool:
    return not (triton_interpreting() or deterministic() or os.environ.get(ENV_AUTOTUNE, "1") in ("", "0"))
