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

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
