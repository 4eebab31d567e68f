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


# ------------------------------------------------------------- the nvcc compile check, in the background

_COMPILE_TEST = "test_every_kernel_source_compiles_with_nvcc"


def pytest_collection_modifyitems(session, config, items):
    """Start .ci/compile_cuda.sh as soon as the run is collected, and run its test last.

    The compile is minutes of nvcc on the CPU while most of the suite (the Triton interpreter) keeps
    one core busy, so on a 2-core CI machine it runs beside the suite on the spare core instead of
    after it; the test then only waits for (and checks) the result. Run alone, the test compiles in
    the foreground with every core, as before.
    """
    import nvcc_check

    compile_items = [item for item in items if item.name == _COMPILE_TEST]
    if not compile_items or len(items) == len(compile_items) or not nvcc_check.available():
        return
    items[:] = [item for item in items if item.name != _COMPILE_TEST] + compile_items
    nvcc_check.start_in_background(jobs=max(1, (os.cpu_count() or 2) - 1))


def pytest_unconfigure(config):
    import nvcc_check

    nvcc_check.stop_background()
