"""Loading the optional CUDA extension ``convmixer_kernels._C`` (built from csrc/).

The extension is imported once, lazily. When it is missing, ``load_error()`` says
so and names the command that builds it; ``extension()`` raises that message.
"""
from __future__ import annotations

import importlib
from typing import Optional

BUILD_COMMAND = "CONVMIXER_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e ."

_state = {"tried": False, "module": None, "error": None}


def _load():
    if _state["tried"]:
        return
    _state["tried"] = True
    try:
        _state["module"] = importlib.import_module("convmixer_kernels._C")
    except ImportError as e:
        _state["error"] = (f"the CUDA extension convmixer_kernels._C is not built ({e}); "
                           f"build it with: {BUILD_COMMAND}")


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
