"""Swap fused modules into an existing model by structure, and back.

Works on this package's ``ConvMixer``, the official ``nn.Sequential`` code and
timm's ``ConvMixer`` (its own ``Residual`` class, blocks under ``blocks.{i}``):
nothing here looks at class names except "Residual" in the wrapper's.

Patterns:
* residual block - a module whose class name contains "Residual" and whose only
  child is ``fn = nn.Sequential(depthwise Conv2d, activation, BatchNorm2d)``;
* pointwise block - ``nn.Sequential(Conv2d 1x1, activation, BatchNorm2d)``;
* layer - ``nn.Sequential(anything, Conv2d 1x1, activation, BatchNorm2d)`` (the
  official layer: the first child is normally the residual block).

Candidates that look like a pattern but cannot be fused (a dilated or strided
conv, another norm, another activation) are left alone, logged as a warning and
listed by ``plan_fusion``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .backends import validate_backend_name
from .modules import (FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock, depthwise_problem,
                      pointwise_problem)

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


def _looks_like_1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)


def _classify(module: nn.Module) -> Optional[FusionCandidate]:
    """The pattern ``module`` is a candidate for (with its problem, if any), or None."""
    if isinstance(module, _FUSED):
        return None
    children = dict(module.named_children())
    if "residual" in type(module).__name__.lower() and list(children) == ["fn"]:
        fn = children["fn"]
        if isinstance(fn, nn.Sequential) and len(fn) == 3 and isinstance(fn[0], nn.Conv2d) \
                and fn[0].groups > 1:
            return FusionCandidate("", "residual", depthwise_problem(fn))
        return None
    if type(module) is nn.Sequential and len(module) in (3, 4) and _looks_like_1x1(module[-3]):
        kind = "pointwise" if len(module) == 3 else "layer"
        return FusionCandidate("", kind, pointwise_problem(*list(module)[-3:]))
    return None


def plan_fusion(model: nn.Module) -> List[FusionCandidate]:
    """Every block ``fuse_convmixer`` would consider, outermost first, with why it cannot be fused."""
    found = []
    for path, module in model.named_modules():
        cand = _classify(module)
        if cand is not None:
            cand.path = path
            found.append(cand)
    return found


def _fuse_one(module: nn.Module, backend: str, path: str) -> nn.Module:
    cand = _classify(module)
    if cand is not None and not cand.fusable:
        log.warning("fuse_convmixer: left %s block %r as it is: %s", cand.kind, path or "<model>", cand.problem)
    elif cand is not None:
        fused = {"residual": FusedDepthwiseBlock, "pointwise": FusedPointwiseBlock,
                 "layer": FusedConvMixerLayer}[cand.kind].from_module(module, backend)
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


def fuse_convmixer(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap, in place, every block that matches a pattern for its fused drop-in; return the model.

    Parameters and buffers are shared, not copied: optimizers built on the model
    keep working. If ``model`` itself is a block, the fused block is returned.
    """
    validate_backend_name(backend)
    return _fuse_one(model, backend, "")


def unfuse_convmixer(model: nn.Module) -> nn.Module:
    """Undo ``fuse_convmixer`` in place (parameters shared); return the model."""
    if isinstance(model, _FUSED):
        ref = model.to_reference()
        return unfuse_convmixer(ref) if isinstance(model, FusedConvMixerLayer) else ref
    for name, child in list(model.named_children()):
        new = unfuse_convmixer(child)
        if new is not child:
            setattr(model, name, new)
    return model
