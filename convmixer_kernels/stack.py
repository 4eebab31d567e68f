"""Whole-layer fusion at the model level: ``FusedSequential`` runs consecutive fused ConvMixer layers as one
fused layer stack (``ops/layer_stack.py``), each BatchNorm's apply folded into the op that reads its output.

The BatchNorm apply crosses layer boundaries, so this is a container-level path: ``FusedSequential`` is an
``nn.Sequential`` holding the same children under the same names (``state_dict`` keys unchanged: the
official model's ``3.0.fn.0.weight``, timm's ``blocks.0.0.fn.0.weight``); only its ``forward`` differs.
``memory`` decides what a training step keeps for the backward:

* ``"normal"`` (the default): the layers run one by one, each block fused (the fastest by the static
  model: a layer keeps x, a, r, p — 4 activations against eager's 6);
* ``"low"``: a run of ``FusedConvMixerLayer`` children runs as one fused stack that keeps only a and p per
  layer (about 0.4x eager's saved bytes), for ~9% more predicted time (1536/20 k9): its backward re-materializes z and r
  (``ops/layer_stack.py``, ``fold_plan``: folding them into the kernels' prologues costs more, because the
  activation is recomputed for every re-read);
* ``"lowest"``: the stack keeps only p and also recomputes the depthwise conv (about 0.2x, ~19% more time).

The stack runs when every BatchNorm in the run normalizes with batch statistics (training) and a fused
backend takes the call; otherwise — eval (two kernels per layer there already), hooks, a structure that
no longer fits, the torch backend — the layers run one by one, each as its own fused (or reference)
module, and the reason is logged (a warning once for a structural reason, debug otherwise).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import nn

from .backends import log_event, requested_backend, choose_backend, validate_backend_name
from .modules import (FusedConvMixerLayer, FusedDepthwiseBlock, depthwise_problem, hooks_reason, pointwise_problem,
                      reference_input_reason)
from .ops.activation import activation_name
from .ops.batchnorm import deferred_batchnorm_call
from .ops.dispatch import compute_dtype, reference_only_reason
from .ops.layer_stack import MEMORY_MODES as STACK_MEMORY_MODES, OP, StackLayer, layer_stack_fused

MEMORY_MODES = ("normal",) + STACK_MEMORY_MODES

log = logging.getLogger("convmixer_kernels")


def _batch_problem(shape, call) -> Optional[str]:
    """Calls on which F.batch_norm raises: the layers run one by one, so the reference's error is raised."""
    n, _, h, w = shape
    if call.use_batch_stats and (n * h * w == 1 or call.eps <= 0.0):
        return "BatchNorm would raise for this input"
    if call.eps < 0.0:
        return "BatchNorm would raise for this eps"
    return None


def _structure_problem(layer: nn.Module) -> Optional[str]:
    if not isinstance(layer, FusedConvMixerLayer):
        return f"{type(layer).__name__} is not a FusedConvMixerLayer"
    dw, conv, act, bn = layer._modules.values()
    if not isinstance(dw, FusedDepthwiseBlock):
        return f"the layer's residual block ({type(dw).__name__}) is not fused"
    return (depthwise_problem(dw.fn) or pointwise_problem(conv, act, bn)
            or hooks_reason(layer, dw, dw.fn, *dw.fn, conv, act, bn))


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose consecutive fused ConvMixer layers run as one fused layer stack.

    ``backend`` ("auto", "torch", "triton", "cuda") and ``memory`` ("normal", "low", "lowest"; see the
    module docstring) are plain attributes, not state, and may be changed at any time. ``last_backend`` says what ran the latest run of layers and ``last_stacked`` whether it ran
    as one stack (False: its layers ran one by one, each on its own backend).
    """

    def __init__(self, *modules: nn.Module, backend: str = "auto", memory: str = "normal"):
        super().__init__(*modules)
        self._init_stack(backend, memory)

    def _init_stack(self, backend: str, memory: str) -> None:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r}: choose one of {MEMORY_MODES}")
        self.backend = validate_backend_name(backend)
        self.memory = memory
        self.last_backend: Optional[str] = None
        self.last_stacked = False  # whether the latest run of layers ran as one fused stack
        self._noted: set = set()

    @classmethod
    def from_module(cls, module: nn.Sequential, backend: str = "auto", memory: str = "normal") -> "FusedSequential":
        """The same children under the same names, shared (not copied)."""
        if type(module) is cls:
            module._init_stack(backend, memory)
            return module
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in module._modules.items():
            new.add_module(name, child)
        new._init_stack(backend, memory)
        new.train(module.training)
        return new

    def to_reference(self) -> nn.Sequential:
        return nn.Sequential(OrderedDict(self._modules)).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            if isinstance(mods[i], FusedConvMixerLayer):
                j = i + 1
                while j < len(mods) and isinstance(mods[j], FusedConvMixerLayer):
                    j += 1
                x = self._run_layers(mods[i:j], x)
                i = j
            else:
                x = mods[i](x)
                i += 1
        return x

    # ------------------------------------------------------------------ the stack

    def _note(self, level: int, reason: str) -> None:
        if reason not in self._noted:
            self._noted.add(reason)
            log_event(level, "FusedSequential: running %s", reason)

    def _plan(self, layers: List[nn.Module], x: torch.Tensor) -> Tuple[Optional[list], str]:
        """(specs, "") when the layers can run as a stack, else (None, why not)."""
        for l, layer in enumerate(layers):
            problem = _structure_problem(layer)
            if problem is not None:
                return None, f"layer {l}: {problem}"
        first_conv = layers[0][0].fn[0]
        if reference_input_reason(x, first_conv) is not None:
            return None, "input the reference handles"
        specs, counts = [], []
        for layer in layers:
            dw, conv, act, bn = layer._modules.values()
            dw_conv, dw_act, dw_bn = dw.fn
            bn1, count1 = deferred_batchnorm_call(dw_bn)
            bn2, count2 = deferred_batchnorm_call(bn)
            for call in (bn1, bn2):
                if not call.use_batch_stats:
                    return None, "eval: BatchNorm uses running statistics"
                problem = _batch_problem(x.shape, call)
                if problem is not None:
                    return None, problem
            specs.append(StackLayer(dw_conv.weight, dw_conv.bias, bn1, conv.weight, conv.bias, bn2,
                                    activation_name(dw_act), activation_name(act), dw_conv.padding))
            counts += [count1, count2]
        groups = {s.bn1.sync_group for s in specs} | {s.bn2.sync_group for s in specs}
        if len(groups) > 1:
            return None, "BatchNorms of the stack synchronize over different process groups"
        return (specs, counts), ""

    def _choose(self, x: torch.Tensor, specs: List[StackLayer], cdtype) -> Tuple[Optional[str], str]:
        """(the fused backend that runs the stack, "") or (None, why the layers run one by one)."""
        why = next((r for s in specs for r in (reference_only_reason(x, s.dw_weight, s.bn1, cdtype),
                                               reference_only_reason(x, s.pw_weight, s.bn2, cdtype)) if r), None)
        if why:
            return None, why
        name = choose_backend(OP, requested_backend(self.backend), x.device, x=x, weight=specs[0].dw_weight,
                              layers=specs, compute_dtype=cdtype)
        return (None, "the torch backend") if name == "torch" else (name, "")

    def _run_layers(self, layers: List[nn.Module], x: torch.Tensor) -> torch.Tensor:
        plan, why, name = None, "memory='normal'", None
        if self.memory != "normal":
            plan, why = self._plan(layers, x)
        if plan is not None:
            specs, counts = plan
            cdtype = compute_dtype(x)
            name, why = self._choose(x, specs, cdtype)
        if name is None:
            self._note(logging.WARNING if why.startswith("layer ") else logging.DEBUG,
                       f"{len(layers)} layers one by one ({why})")
            for layer in layers:
                x = layer(x)
            self.__dict__["last_backend"] = layers[-1].__dict__.get("last_backend")
            self.__dict__["last_stacked"] = False
            return x
        for count in counts:  # as the reference modules count their batches, before running
            count()
        with torch.profiler.record_function(f"convmixer_kernels::{OP}[{name}]"):
            if torch.is_autocast_enabled(x.device.type):
                specs = [_cast(s, cdtype) for s in specs]
                with torch.autocast(x.device.type, enabled=False):
                    z = layer_stack_fused(x.to(cdtype), specs, backend=name, memory=self.memory,
                                          sync_group=specs[0].bn1.sync_group)
            else:
                z = layer_stack_fused(x, specs, backend=name, memory=self.memory, sync_group=specs[0].bn1.sync_group)
        self.__dict__["last_backend"] = name
        self.__dict__["last_stacked"] = True
        for layer in layers:
            layer.__dict__["last_backend"] = name
            layer[0].__dict__["last_backend"] = name
        return z

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, memory={self.memory!r}"


def _cast(s: StackLayer, dtype: torch.dtype) -> StackLayer:
    """Autocast: the convs' weights and biases in the compute dtype (BatchNorm stays float32)."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return StackLayer(c(s.dw_weight), c(s.dw_bias), s.bn1, c(s.pw_weight), c(s.pw_bias), s.bn2, s.dw_activation,
                      s.pw_activation, s.padding)


def stackable(module: nn.Module) -> bool:
    """Whether ``module`` is a plain nn.Sequential with a fused ConvMixer layer among its children."""
    return type(module) is nn.Sequential and not (module._forward_hooks or module._forward_pre_hooks) and any(
        isinstance(m, FusedConvMixerLayer) and isinstance(m[0], FusedDepthwiseBlock) for m in module.children())
