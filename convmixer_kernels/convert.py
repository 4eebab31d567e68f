"""Swap fused modules into an existing model by structure, and back.

Works on this package's ``ConvMixer``, the official ``nn.Sequential`` code and
timm's ``ConvMixer`` (its own ``Residual`` class, blocks under ``blocks.{i}``).
No class name is trusted: a residual wrapper is fused only when its ``forward``
is verified to compute exactly ``fn(x) + x`` (see ``residual_wrapper_problem``).

Patterns:
* residual block - a module with a child ``fn = nn.Sequential(depthwise Conv2d,
  activation, BatchNorm2d)`` whose forward is exactly ``fn(x) + x``;
* pointwise block - ``nn.Sequential(Conv2d 1x1, activation, BatchNorm2d)``;
* layer - ``nn.Sequential(anything, Conv2d 1x1, activation, BatchNorm2d)`` (the
  official layer: the first child is normally the residual block).

Candidates that look like a pattern but cannot be fused (a dilated or strided
conv, another norm, another activation, a layer-scale or drop-path residual, a
module with hooks or parametrizations the fused kernel would skip) are left
alone, logged as a warning and listed by ``plan_fusion``.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .backends import validate_backend_name
from .modules import (FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock, depthwise_problem,
                      pointwise_problem)
from .stack import MEMORY_MODES, FusedSequential, stackable

log = logging.getLogger("convmixer_kernels")

_FUSED = (FusedDepthwiseBlock, FusedPointwiseBlock, FusedConvMixerLayer)


@dataclass
class FusionCandidate:
    path: str  # dotted name in the model ("" for the model itself)
    kind: str  # "residual", "pointwise" or "layer"
    problem: Optional[str]  # None: fusable

    @property
    def fusable(self) -> bool:
        return self.problem is None


# ------------------------------------------------------------ residual wrappers
# The forwards known to compute exactly fn(x) + x: this package's Residual, the official
# code's and timm's all read ``return self.fn(x) + x``. Compared by bytecode (same
# interpreter, so same compiler), never by class name.


def _plain_residual(self, x):
    return self.fn(x) + x


def _plain_residual_commuted(self, x):
    return x + self.fn(x)


def _code_key(code: types.CodeType):
    return (code.co_code, code.co_names, code.co_consts, code.co_argcount, code.co_kwonlyargcount,
            code.co_freevars, code.co_flags & 0x3AC)  # varargs/kwargs, generator/coroutine; not the nesting flags


_KNOWN_RESIDUAL_CODE = {_code_key(f.__code__) for f in (_plain_residual, _plain_residual_commuted)}


class _Times3:
    """A stand-in ``fn`` for the behavioural check (not an nn.Module: nothing is registered)."""

    def __call__(self, t):
        return 3 * t


def residual_wrapper_problem(module: nn.Module) -> Optional[str]:
    """None when ``module``'s forward is verified to be exactly ``fn(x) + x``, else why not.

    Three checks: the class does not override ``__call__``; ``forward`` is a plain function whose
    bytecode is one of the known forms; and, run on a probe object whose ``fn`` multiplies by 3
    (and that has no other attribute), it returns 4·x. The wrapper must own no parameters or
    buffers of its own (a layer scale ``gamma`` would be one) and no child but ``fn``.
    """
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    extra_children = [n for n, _ in module.named_children() if n != "fn"]
    own_state = [n for n, _ in module.named_parameters(recurse=False)] + \
                [n for n, _ in module.named_buffers(recurse=False)]
    if extra_children or own_state:
        return (f"residual wrapper {name} has {', '.join(extra_children + own_state)} besides fn "
                "(layer scale? drop path?), so it does not compute exactly fn(x) + x")
    if cls.__call__ is not nn.Module.__call__:
        return f"residual wrapper {name} overrides __call__"
    forward = getattr(cls, "forward", None)
    code = getattr(forward, "__code__", None)
    if not isinstance(forward, types.FunctionType) or code is None or forward.__defaults__ or forward.__closure__:
        return f"residual wrapper {name}.forward is not a plain function"
    if _code_key(code) not in _KNOWN_RESIDUAL_CODE:
        where = f"{code.co_filename}:{code.co_firstlineno}"
        return (f"residual wrapper {name}.forward ({where}) is not exactly 'return self.fn(x) + x' "
                "(layer scale, stochastic depth or another variant): fusing would change its output")
    probe = types.SimpleNamespace(fn=_Times3())  # no .training, no other attribute: a variant would fail here
    x = torch.tensor([1.0, -2.0, 0.5])
    try:
        with torch.no_grad():
            y = forward(probe, x)
    except Exception as e:  # the forward reads something besides fn
        return f"residual wrapper {name}.forward failed the behavioural check ({type(e).__name__}: {e})"
    if not (isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, 4 * x)):
        return f"residual wrapper {name}.forward does not return fn(x) + x in the behavioural check"
    return None


# ------------------------------------------------------------ hooks and parametrizations
# The fused forward never calls the inner conv/activation/BatchNorm modules, and fusion
# replaces the wrapper/Sequential object, so any hook on those would silently stop running.


def _hook_problem(path: str, modules: Iterable[tuple]) -> Optional[str]:
    found = []
    for name, m in modules:
        kinds = [label for attr, label in (("_forward_pre_hooks", "forward pre-hook"),
                                           ("_forward_hooks", "forward hook"),
                                           ("_backward_pre_hooks", "backward pre-hook"),
                                           ("_backward_hooks", "backward hook"))
                 if getattr(m, attr, None)]
        if parametrize.is_parametrized(m):
            kinds.append("parametrization")
        if kinds:
            where = ".".join(p for p in (path, name) if p) or "<model>"
            found.append(f"{where} has a {' and a '.join(sorted(set(kinds)))}")
    if found:
        return "; ".join(found) + " (the fused kernel would skip it; remove it before fusing, or keep this block unfused)"
    return None


def _prefixed(prefix: str, module: nn.Module):
    return [((f"{prefix}.{n}" if n else prefix) if prefix else n, m) for n, m in module.named_modules()]


# ------------------------------------------------------------ classification


def _looks_like_1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)


def _looks_like_residual(module: nn.Module) -> bool:
    fn = getattr(module, "_modules", {}).get("fn")
    return isinstance(fn, nn.Sequential) and len(fn) == 3 and isinstance(fn[0], nn.Conv2d) and fn[0].groups > 1


def _classify(module: nn.Module, path: str = "") -> Optional[FusionCandidate]:
    """The pattern ``module`` is a candidate for (with its problem, if any), or None."""
    if isinstance(module, _FUSED):
        return None
    if _looks_like_residual(module):
        problem = (residual_wrapper_problem(module) or _hook_problem(path, _prefixed("", module))
                   or depthwise_problem(module.fn))
        return FusionCandidate(path, "residual", problem)
    if type(module) is nn.Sequential and len(module) in (3, 4) and _looks_like_1x1(module[-3]):
        kind = "pointwise" if len(module) == 3 else "layer"
        # a layer's first child stays a module call (it is classified on its own), so only
        # the layer object and its last three children are looked at for hooks here
        mods = [("", module)] + [m for i in range(len(module) - 3, len(module)) for m in _prefixed(str(i), module[i])]
        problem = _hook_problem(path, mods) or pointwise_problem(*list(module)[-3:])
        return FusionCandidate(path, kind, problem)
    return None


def plan_fusion(model: nn.Module) -> List[FusionCandidate]:
    """Every block ``fuse_convmixer`` would consider, outermost first, with why it cannot be fused."""
    found = []
    for path, module in model.named_modules():
        cand = _classify(module, path)
        if cand is not None:
            found.append(cand)
    return found


def _make_fused(kind: str, module: nn.Module, backend: str) -> nn.Module:
    if kind == "residual":
        return FusedDepthwiseBlock.from_module(module, backend)
    if kind == "pointwise":
        return FusedPointwiseBlock.from_module(module, backend)
    # FusedConvMixerLayer.from_module would fuse any first child with a fusable ``fn`` without
    # checking the wrapper or its hooks; build it around a placeholder and put the original first
    # child back, so that _fuse_children classifies it like every other residual block.
    first = module[0]
    fused = FusedConvMixerLayer.from_module(nn.Sequential(nn.Identity(), *list(module)[1:]), backend)
    fused.train(module.training)
    fused._modules["0"] = first
    return fused


def _fuse_one(module: nn.Module, backend: str, path: str) -> nn.Module:
    cand = _classify(module, path)
    if cand is not None and not cand.fusable:
        log.warning("fuse_convmixer: left %s block %r as it is: %s", cand.kind, path or "<model>", cand.problem)
    elif cand is not None:
        fused = _make_fused(cand.kind, module, backend)
        # a layer's first child may itself hold blocks (e.g. an unfusable residual's insides)
        _fuse_children(fused, backend, path)
        return fused
    elif isinstance(module, _FUSED):
        for m in module.modules():
            if isinstance(m, _FUSED):
                m.backend = backend
        return module
    _fuse_children(module, backend, path)
    return module


def _fuse_children(module: nn.Module, backend: str, path: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(module, _FUSED) and not (isinstance(module, FusedConvMixerLayer) and name == "0"):
            continue  # a fused block's own conv, activation and BatchNorm
        new = _fuse_one(child, backend, f"{path}.{name}" if path else name)
        if new is not child:
            setattr(module, name, new)


def fuse_convmixer(model: nn.Module, backend: str = "auto", *, stack: bool = True,
                   memory: str = "normal") -> nn.Module:
    """Swap, in place, every block that matches a pattern for its fused drop-in; return the model.

    Parameters and buffers are shared, not copied: optimizers built on the model
    keep working. If ``model`` itself is a block, the fused block is returned.
    Blocks whose wrapper is not verified to be ``fn(x) + x``, or that carry hooks or
    parametrizations, are left as they are with a logged reason.

    ``stack=True`` (the default) also makes every plain ``nn.Sequential`` that holds fused layers
    (the official model itself, timm's ``blocks``) a ``FusedSequential`` with the same children and
    state_dict keys, whose ``memory`` (``"normal"``, ``"low"``, ``"lowest"``) decides whether its
    consecutive layers train block by block (the fastest) or as one fused stack that keeps two or one
    activations per layer for the backward (design.md 3.3). ``stack=False`` leaves the containers alone.
    """
    validate_backend_name(backend)
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}: choose one of {MEMORY_MODES}")
    model = _fuse_one(model, backend, "")
    return _stack_sequentials(model, backend, memory) if stack else model


def _stack_sequentials(module: nn.Module, backend: str, memory: str) -> nn.Module:
    """``module`` with every stackable nn.Sequential in it (itself included) made a FusedSequential."""
    for name, child in list(module.named_children()):
        new = _stack_sequentials(child, backend, memory)
        if new is not child:
            setattr(module, name, new)
    if isinstance(module, FusedSequential) or stackable(module):
        return FusedSequential.from_module(module, backend, memory)
    return module


def unfuse_convmixer(model: nn.Module) -> nn.Module:
    """Undo ``fuse_convmixer`` in place (parameters shared); return the model."""
    if isinstance(model, FusedSequential):
        model = model.to_reference()
    if isinstance(model, _FUSED):
        ref = model.to_reference()
        return unfuse_convmixer(ref) if isinstance(model, FusedConvMixerLayer) else ref
    for name, child in list(model.named_children()):
        new = unfuse_convmixer(child)
        if new is not child:
            setattr(model, name, new)
    return model
