"""The backend contract's launchers written with torch ops: the executable specification that the Triton
and CUDA launchers are tested against, and the kernels the fused layer stack runs on the "torch" backend
(``ops/layer_stack.py``), so its algebra and its hand-written backward run anywhere, CPU included.

Math is float32 (float64 for float64 inputs) with one rounding per stored tensor, as the kernels do.
These are not registered as a block backend: the blocks' "torch" backend is their reference composition.
"""
