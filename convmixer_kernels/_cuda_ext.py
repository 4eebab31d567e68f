"""Loading the optional CUDA extension ``convmixer_kernels._C`` (built from csrc/).

The extension is imported once, lazily. ``load_error()`` is None when it loaded, else why
not, with the command that fixes it; ``extension()`` raises that message. A build made for
another torch or CUDA is refused: the extension records what it was built against
(``_C.build_info()``, written by csrc/build_cuda.py) and ``build_mismatch`` compares that with
the running torch. Whether the built GPU code runs on a given device is ``arch_error(device)``.
"""
from __future__ import annotations

import importlib
from typing import List, Mapping, Optional

BUILD_COMMAND = "CONVMIXER_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e ."
ARCHS_ENV = "CONVMIXER_KERNELS_CUDA_ARCHS"

_state = {"tried": False, "module": None, "error": None}


def build_mismatch(info: Mapping[str, object], torch_version: str, cuda_version: Optional[str]) -> Optional[str]:
    """Why an extension built as ``info`` says must not run under this torch, or None."""
    if info.get("emulated"):
        return "it is the CPU emulator build used by the tests, not a CUDA build"
    built_torch, built_cuda = str(info.get("torch")), str(info.get("cuda"))
    # the same release is the same ABI whatever its local tag: PyPI's "2.11.0" (a CUDA 13.0 build)
    # and an index's "2.11.0+cu130"; the CUDA versions are compared next
    if built_torch.split("+")[0] != torch_version.split("+")[0]:
        return f"it was built against torch {built_torch} but torch {torch_version} is running"
    if built_cuda != str(cuda_version):
        return f"it was built against CUDA {built_cuda} but torch uses CUDA {cuda_version}"
    return None


def _import(name: str):
    """Import the extension module; (module, None) or (None, why not with the fix)."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in (name, name.rsplit(".", 1)[0]):
            raise  # something the extension itself imports is missing: a real bug, not "not built"
        return None, f"the CUDA extension {name} is not built; build it with: {BUILD_COMMAND}"
    except ImportError as e:  # typically an undefined symbol: built against another torch
        return None, (f"the CUDA extension {name} failed to load ({e}); it was most likely built against "
                      f"another torch or CUDA version; rebuild it with: {BUILD_COMMAND}")
    return module, None


def _load(name: str = "convmixer_kernels._C") -> None:
    if _state["tried"]:
        return
    _state["tried"] = True
    module, error = _import(name)
    if module is not None:
        import torch

        reason = build_mismatch(module.build_info(), torch.__version__, torch.version.cuda)
        if reason:
            module = None
            error = f"refusing to use the CUDA extension {name}: {reason}; rebuild it with: {BUILD_COMMAND}"
    _state["module"], _state["error"] = module, error


def reset() -> None:
    """Forget the previous attempt (tests)."""
    _state.update(tried=False, module=None, error=None)


def load_error() -> Optional[str]:
    """None when the extension is importable, else why not (with the fix)."""
    _load()
    return _state["error"]


def extension():
    """The loaded extension module; raises RuntimeError naming the build command when missing."""
    _load()
    if _state["module"] is None:
        raise RuntimeError(_state["error"])
    return _state["module"]


def _parse_archs(text: str) -> List[str]:
    return [a for a in text.replace(",", ";").split(";") if a.strip()]


def arch_error(capability, info: Optional[Mapping[str, object]] = None) -> Optional[str]:
    """Why the extension's GPU code cannot run on a device of compute ``capability`` (major, minor).

    Code built for sm_XY runs on devices with the same major version and a minor version >= Y;
    the PTX of the newest architecture is JIT-compiled on any device at least that new.
    """
    if info is None:
        info = extension().build_info()
    major, minor = capability
    device = major * 10 + minor
    archs = _parse_archs(str(info.get("archs", "")))
    if not archs:
        return None  # unknown (a build without recorded info): let the launch report it
    for arch in archs:
        a = int(arch.rstrip("a"))
        if arch.endswith("a") and a != device:
            continue  # arch-specific code runs only on exactly that architecture
        if a // 10 == major and a % 10 <= minor:
            return None
    ptx = str(info.get("ptx", ""))
    if ptx and int(ptx.rstrip("a")) <= device and not ptx.endswith("a"):
        return None
    return (f"the CUDA extension was built for sm_{', sm_'.join(archs)} but the device is sm_{device}; rebuild it "
            f"with: {ARCHS_ENV}=\"{major}{minor}\" {BUILD_COMMAND}")


def device_arch_error(device) -> Optional[str]:
    """arch_error for a torch device (None for non-CUDA devices)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return arch_error(torch.cuda.get_device_capability(device))
