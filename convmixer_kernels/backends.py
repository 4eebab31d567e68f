"""Backend selection, in one place.

Three backends compute the same fused blocks:

* ``"torch"``  - the reference composition of PyTorch ops. Runs anywhere.
* ``"triton"`` - Triton kernels. Needs a CUDA tensor, or ``TRITON_INTERPRET=1``
  (the interpreter, CPU tensors; only when asked for explicitly, never by "auto").
* ``"cuda"``   - the hand-written CUDA extension built from ``csrc/``.

``"auto"`` (the default, overridable with the ``CONVMIXER_KERNELS_BACKEND``
environment variable) takes the first backend in ``PREFERENCE`` that can run the
call and logs, at debug level, why it skipped the others. An explicitly requested
backend that cannot run in this environment raises ``BackendUnavailableError``
naming the reason and the fix. An explicitly requested backend that runs here but
does not support one particular call (say a dtype) falls back to "torch" and logs
a warning once per reason. ``CONVMIXER_KERNELS_STRICT=1`` turns that fallback into
an error (benchmarks use it so they never time the wrong thing).

Each op's interface file (``ops/depthwise_block.py``, ``ops/pointwise_block.py``)
registers its contract with ``register_op``: the reference, the fused entry point and
the module of each fused backend, imported lazily, so a missing Triton or an unbuilt
extension never breaks the torch path.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

log = logging.getLogger("convmixer_kernels")

BACKENDS = ("torch", "triton", "cuda")
PREFERENCE = ("cuda", "triton", "torch")  # what "auto" tries, best first
ENV_BACKEND = "CONVMIXER_KERNELS_BACKEND"
ENV_STRICT = "CONVMIXER_KERNELS_STRICT"

def log_event(level: int, msg: str, *args) -> None:
    """Log, except while torch.compile traces (a logging call would break the graph)."""
    if not torch.compiler.is_compiling():
        log.log(level, msg, *args)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


def validate_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS))
    return name


def requested_backend(name: str = "auto") -> str:
    """The backend a caller asked for, with the environment variable replacing the default "auto"."""
    validate_backend_name(name)
    if name == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env:
            try:
                return validate_backend_name(env)
            except ValueError as e:
                raise ValueError(f"{ENV_BACKEND}={env!r}: {e}") from None
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e}); fix: pip install 'triton>=3.6'"
    return None


def _cuda_extension_error() -> Optional[str]:
    from . import _cuda_ext

    return _cuda_ext.load_error()


def environment_reason(backend: str, device: torch.device, *, auto: bool = False) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` in this environment, or None if it can.

    With ``auto=True`` the Triton interpreter does not count: it is a debugging
    path, used only when "triton" is asked for by name.
    """
    device = torch.device(device)
    if backend == "torch":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}): no CUDA device or a CPU build"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if triton_interpreting():
            if auto:
                return ("input is on CPU: 'auto' does not use the Triton interpreter "
                        "(TRITON_INTERPRET=1); ask for backend='triton' to use it")
            return None
        return (f"input is on {device.type}: Triton kernels need a CUDA tensor "
                "(or TRITON_INTERPRET=1 and backend='triton' to run them in the interpreter on CPU)")
    if backend == "cuda":
        if device.type != "cuda":
            return f"input is on {device.type}: the CUDA extension needs a CUDA tensor"
        return _cuda_extension_error()
    raise ValueError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------- op registry


@dataclass
class OpEntry:
    """One op's contract (see ops/depthwise_block.py): its reference, the function that runs it on a
    fused backend (the reference's signature plus ``backend=``), the contract's own limits, and the
    module of each fused backend ("module.path", imported on first use, so a missing Triton or an
    unbuilt extension never breaks the torch path)."""

    reference: Callable
    fused: Callable
    unsupported: Callable[..., Optional[str]]
    kernels: Dict[str, str]
    loaded: Dict[str, object] = field(default_factory=dict)


_REGISTRY: Dict[str, OpEntry] = {}


def register_op(op: str, *, reference: Callable, fused: Callable, unsupported: Callable[..., Optional[str]],
                kernels: Dict[str, str]) -> None:
    for backend in kernels:
        validate_backend_name(backend)
    _REGISTRY[op] = OpEntry(reference, fused, unsupported, dict(kernels))


def implemented_backends(op: str):
    entry = _REGISTRY.get(op)
    return [b for b in BACKENDS if b == "torch" or (entry is not None and b in entry.kernels)]


def kernels(op: str, backend: str):
    """The module implementing ``op``'s launchers on ``backend`` (imported once)."""
    entry = _REGISTRY[op]
    module = entry.loaded.get(backend)
    if module is None:
        if backend not in entry.kernels:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is not implemented for this op; "
                                          f"use one of {implemented_backends(op)}")
        module = entry.loaded[backend] = importlib.import_module(entry.kernels[backend])
    return module


def _call_reason(op: str, backend: str, device, config: dict, auto: bool) -> Optional[str]:
    """Why ``backend`` cannot run this call of ``op`` (environment, then the contract, then the backend)."""
    if backend not in implemented_backends(op):
        return f"no {backend} implementation of {op}"
    reason = environment_reason(backend, device, auto=auto)
    if reason or backend == "torch":
        return reason
    return _REGISTRY[op].unsupported(**config) or kernels(op, backend).unsupported(**config)


_warned: set = set()


def _fallback(op: str, backend: str, reason: str, to: str = "torch") -> str:
    if strict():
        raise BackendUnavailableError(f"{op}: backend {backend!r} does not support this call: {reason} "
                                      f"({ENV_STRICT} is set, so no fallback)")
    key = (op, backend, reason)
    if key not in _warned:
        _warned.add(key)
        log_event(logging.WARNING, "%s: backend %r does not support this call (%s); falling back to %r",
                  op, backend, reason, to)
    return to


def strict() -> bool:
    return os.environ.get(ENV_STRICT, "0") not in ("", "0")


def _auto(op: str, device, config: dict) -> str:
    for name in PREFERENCE:
        reason = _call_reason(op, name, device, config, auto=True)
        if reason is None:
            return name
        log_event(logging.DEBUG, "%s: auto skipped backend %r: %s", op, name, reason)
    raise AssertionError("the torch backend always runs")  # pragma: no cover


def choose_backend(op: str, requested: str, device, **config) -> str:
    """Pick the backend that runs one call of ``op``; see the module docstring for the rules.

    A backend asked for by name that has no implementation of this op (the pointwise block on
    "cuda") runs what "auto" would choose instead, logged once; the module's ``last_backend`` says so.
    """
    requested = requested_backend(requested)
    if requested == "auto":
        return _auto(op, device, config)
    reason = environment_reason(requested, device)
    if reason:
        raise BackendUnavailableError(f"{op}: backend {requested!r} cannot run here: {reason}")
    if requested not in implemented_backends(op):
        choice = _auto(op, device, config)
        return _fallback(op, requested, f"{op} has no {requested} implementation", to=choice)
    reason = _call_reason(op, requested, device, config, auto=False)
    if reason:
        return _fallback(op, requested, reason)
    return requested


def implementation(op: str, backend: str) -> Callable:
    """``op`` on ``backend`` with the reference's signature (the reference itself for "torch")."""
    entry = _REGISTRY[op]
    if backend == "torch":
        return entry.reference
    return functools.partial(entry.fused, backend=backend)


def explain_backends(device=None) -> Dict[str, Optional[str]]:
    """For each backend: None if it can run on ``device`` here, else the reason it cannot.

    ``device`` defaults to the first CUDA device when there is one, else the CPU.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {name: environment_reason(name, device, auto=True) for name in PREFERENCE}


def available_backends(device=None):
    """Backends that "auto" may choose on ``device`` (best first)."""
    return [name for name, reason in explain_backends(device).items() if reason is None]
