"""Install convmixer-kernels.

The Python package (torch reference + Triton kernels) installs without nvcc.
The CUDA extension in csrc/ is optional and controlled by these switches:

  CONVMIXER_KERNELS_FORCE_BUILD=1      build the extension (fail loudly if it cannot)
  CONVMIXER_KERNELS_SKIP_CUDA_BUILD=1  never build it
  CONVMIXER_KERNELS_CUDA_ARCHS="80;90" target architectures (default: 80;90)
  MAX_JOBS=N                            parallel compile jobs (torch's variable)

Without either switch the extension is built only when torch with CUDA and nvcc
are both present. Build it against your installed torch with:

  CONVMIXER_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e .
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "convmixer_kernels"))
from _version import __version__  # noqa: E402

sys.path.pop(0)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_extension_build():
    """Return (ext_modules, cmdclass) for the optional CUDA extension."""
    force = _flag("CONVMIXER_KERNELS_FORCE_BUILD")
    if _flag("CONVMIXER_KERNELS_SKIP_CUDA_BUILD") and not force:
        return [], {}
    try:
        from build_cuda import cuda_extension_build as build  # csrc/build_cuda.py
    except ImportError:
        build = None
    if build is None:
        if force:
            raise RuntimeError("CONVMIXER_KERNELS_FORCE_BUILD=1 but csrc/build_cuda.py is missing")
        return [], {}
    return build(force=force)


sys.path.insert(0, os.path.join(HERE, "csrc"))
ext_modules, cmdclass = cuda_extension_build()
sys.path.pop(0)

setup(
    name="convmixer-kernels",
    version=__version__,
    description="Fused Triton and CUDA kernels for ConvMixer (depthwise conv + GELU + BatchNorm + residual, 1x1 conv + GELU + BatchNorm)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["convmixer_kernels", "convmixer_kernels.*"]),
    package_data={"convmixer_kernels": ["data/*"]},
    python_requires=">=3.9",
    # torch is not pinned here: pip would replace a CUDA build you already have.
    # On a machine without torch, install it first (README: the two commands).
    install_requires=["torch>=2.4", "numpy", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        # triton pinned for the tests: the interpreter of older versions cannot run loops with runtime bounds
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton==3.9.0; platform_system == 'Linux'", "Pillow>=9"],
        # train --data on an image folder (CIFAR-10 python batches and the shipped digits need nothing)
        "data": ["Pillow>=9"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
    entry_points={"console_scripts": ["convmixer-kernels=convmixer_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
