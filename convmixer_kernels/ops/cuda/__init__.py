"""The CUDA backend: the hand-written CUDA extension (csrc/, ``convmixer_kernels._C``) and cuBLAS."""
