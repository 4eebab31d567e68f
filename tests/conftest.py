"""Test set-up: the Triton interpreter on machines without a GPU, poisoned kernel outputs, tf32 off.

TRITON_INTERPRET must be set before triton is first imported. The package imports
triton (the Triton kernels live in the op files), so this runs before any test module
imports the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CONVMIXER_KERNELS_POISON", "1")
# The tests pick backends explicitly; a user's override must not change what they test.
os.environ.pop("CONVMIXER_KERNELS_BACKEND", None)
os.environ.pop("CONVMIXER_KERNELS_DW_PATH", None)
os.environ.pop("CONVMIXER_KERNELS_FOLD", None)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _round_bf16_like_the_gpu() -> None:
    """The interpreter (triton 3.x) casts float32 -> bfloat16 by truncation; the GPU's ``cvt.rn.bf16.f32``
    (what ``.to(tl.bfloat16)`` compiles to) rounds to nearest even. A chain of truncated roundings biases
    results toward zero (a 3-layer stack in bf16 lands ~8x PyTorch's error), so under the interpreter the
    cast is made to round as on the GPU. Only that one cast changes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating = builder.cast_impl
    if getattr(truncating, "_rounds_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            data = rounded.view(torch.int16).numpy().view(np.uint16).reshape(src.data.shape)
            return interpreter.TensorHandle(data, dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl._rounds_to_nearest = True
    builder.cast_impl = cast_impl


_round_bf16_like_the_gpu()
