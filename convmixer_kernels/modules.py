"""Drop-in fused modules.

Each holds the same child modules, parameters and buffers as the block it
replaces, so ``state_dict`` keys, ``load_state_dict``, ``.to()``, ``.train()``,
optimizers and checkpoints behave exactly as with the reference; only
``forward`` differs. ``backend`` ("auto", "torch", "triton", "cuda") is a plain
attribute, not state. ``last_backend`` says which backend ran the latest forward.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from .backends import log_event, validate_backend_name
from .ops.activation import activation_name, make_activation
from .ops.batchnorm import deferred_batchnorm_call
from .ops.depthwise_block import depthwise_block, same_padding
from .ops.pointwise_block import pointwise_block

log = logging.getLogger("convmixer_kernels")


class Residual(nn.Module):
    """``fn(x) + x``, as in the official ConvMixer code."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


# ------------------------------------------------------------ structure checks
# Each returns None when the module fits the fused kernel, else why not.


def _activation_problem(act: nn.Module) -> Optional[str]:
    if activation_name(act) is None:
        return f"activation {act!r} is not one of nn.GELU(), nn.GELU(approximate='tanh'), nn.ReLU()"
    return None


def _batchnorm_problem(bn: nn.Module, channels: int) -> Optional[str]:
    from .syncbn import SyncBatchNorm

    if type(bn) not in (nn.BatchNorm2d, SyncBatchNorm) and not isinstance(bn, nn.SyncBatchNorm):
        return f"{type(bn).__name__} is not nn.BatchNorm2d or a SyncBatchNorm"
    if bn.num_features != channels:
        return f"BatchNorm2d has {bn.num_features} features but the conv has {channels} output channels"
    return None


def depthwise_problem(fn: nn.Module) -> Optional[str]:
    """Why ``fn`` is not Sequential(depthwise Conv2d, activation, BatchNorm2d) of a fusable kind."""
    if not isinstance(fn, nn.Sequential) or len(fn) != 3:
        return "not an nn.Sequential of three modules (conv, activation, BatchNorm2d)"
    conv, act, bn = fn
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not nn.Conv2d"
    c = conv.in_channels
    if conv.out_channels != c or conv.groups != c:
        return f"conv is not depthwise (in={c}, out={conv.out_channels}, groups={conv.groups})"
    if conv.stride != (1, 1):
        return f"stride {conv.stride} is not supported (only 1)"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation} is not supported (only 1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
    try:
        same_padding(conv.padding, conv.kernel_size)
    except ValueError as e:
        return str(e)
    return _activation_problem(act) or _batchnorm_problem(bn, c)


def pointwise_problem(conv: nn.Module, act: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why (conv, act, bn) is not a fusable 1x1 Conv2d, activation, BatchNorm2d."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not nn.Conv2d"
    if conv.kernel_size != (1, 1):
        return f"kernel {conv.kernel_size} is not 1x1"
    if conv.stride != (1, 1):
        return f"stride {conv.stride} is not supported (only 1)"
    if conv.groups != 1:
        return f"groups={conv.groups} is not supported (only 1)"
    if conv.padding not in ("same", "valid", (0, 0)):
        return f"padding={conv.padding} changes the output size"
    return _activation_problem(act) or _batchnorm_problem(bn, conv.out_channels)


def reference_input_reason(x: torch.Tensor, conv: nn.Conv2d) -> Optional[str]:
    """Inputs the reference conv itself rejects (its error is the right one, raised before any state
    changes): run the reference composition for them."""
    if x.dim() != 4:
        return f"input has {x.dim()} dimensions"
    if not x.is_floating_point():
        return f"input dtype {x.dtype}"
    if x.shape[1] != conv.in_channels:
        return f"input has {x.shape[1]} channels, the conv expects {conv.in_channels}"
    if x.shape[2] == 0 or x.shape[3] == 0:
        return f"input of shape {tuple(x.shape)} has an empty feature map"
    return None


def hooks_reason(*modules: nn.Module) -> Optional[str]:
    """Why the fused kernel cannot honour these children's hooks or parametrizations, or None.
    (Runs on every call: the module dicts are read directly, without nn.Module.__getattr__.)"""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{type(m).__name__} has forward hooks or pre-hooks (e.g. torch.nn.utils.prune, weight_norm)"
        if "parametrizations" in m._modules:  # what torch.nn.utils.parametrize.is_parametrized looks for
            return f"{type(m).__name__} is parametrized"
    return None


class _FusedBase:
    """What both fused modules share: the backend attribute and the bookkeeping of the last call."""

    def _init_fused(self, backend: str):
        self.backend = validate_backend_name(backend)
        self.last_backend: Optional[str] = None
        self._warned_problem = False
        self._verdicts: dict = {}  # backend choices per call signature (ops/dispatch.py: run_block)

    def _structure_changed(self, problem: str) -> None:
        if not self._warned_problem:
            self._warned_problem = True
            log_event(logging.WARNING, "%s no longer fits the fused kernels (%s); running the reference composition",
                      type(self).__name__, problem)
        self.last_backend = "torch"

    def _reference_reason(self, x: torch.Tensor, conv: nn.Conv2d, structure_problem: Optional[str],
                          *children: nn.Module) -> Optional[str]:
        """Why this call runs the reference composition (logged once where it is the module's state,
        silent where the reference is about to raise for the input), or None."""
        if reference_input_reason(x, conv) is not None:
            self.last_backend = "torch"
            return "input"
        problem = structure_problem or hooks_reason(*children)
        if problem is not None:
            self._structure_changed(problem)
        return problem


def _pointwise_forward(owner: _FusedBase, conv: nn.Conv2d, act: nn.Module, bn: nn.BatchNorm2d,
                       x: torch.Tensor) -> torch.Tensor:
    """The pointwise block's forward on the owner's backend (shared by the block and the layer)."""
    if owner._reference_reason(x, conv, pointwise_problem(conv, act, bn), conv, act, bn) is not None:
        return bn(act(conv(x)))
    call, count_batch = deferred_batchnorm_call(bn)
    z, ran = pointwise_block(x, conv.weight, conv.bias, call, activation=activation_name(act),
                             backend=owner.backend, verdicts=owner._verdicts, on_start=count_batch)
    owner.__dict__["last_backend"] = ran  # a plain attribute: skip nn.Module.__setattr__ on the hot path
    return z


class FusedDepthwiseBlock(nn.Module, _FusedBase):
    """Drop-in for ``Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), nn.GELU(),
    nn.BatchNorm2d(dim)))``: same children ``fn.0``, ``fn.1``, ``fn.2``; forward fused."""

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu", *, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.fn = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same", **kw),
                                make_activation(activation), nn.BatchNorm2d(dim, **kw))
        self._reference_type = Residual
        self._init_fused(backend)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedDepthwiseBlock":
        """Wrap a residual block's ``fn``, sharing (not copying) its parameters and buffers."""
        if isinstance(module, FusedDepthwiseBlock):
            module.backend = validate_backend_name(backend)
            return module
        from .convert import residual_wrapper_problem  # convert imports this module

        fn = getattr(module, "fn", None)
        problem = "module has no child 'fn'" if fn is None else (residual_wrapper_problem(module)
                                                                 or depthwise_problem(fn))
        if problem is not None:
            raise ValueError(f"cannot fuse {type(module).__name__}: {problem}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.fn = fn
        new._reference_type = type(module)
        new._init_fused(backend)
        new.train(module.training)
        return new

    def to_reference(self) -> nn.Module:
        """The unfused residual block, of the wrapper class this was made from, sharing parameters."""
        try:
            ref = self._reference_type(self.fn)
        except Exception as e:  # a wrapper class with another constructor
            log.warning("cannot rebuild %s(fn) (%s); using convmixer_kernels.Residual", self._reference_type, e)
            ref = Residual(self.fn)
        return ref.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, act, bn = self.fn
        if self._reference_reason(x, conv, depthwise_problem(self.fn), self.fn, conv, act, bn) is not None:
            return self.fn(x) + x
        call, count_batch = deferred_batchnorm_call(bn)
        y, ran = depthwise_block(x, conv.weight, conv.bias, call, activation=activation_name(act),
                                 padding=conv.padding, backend=self.backend, verdicts=self._verdicts,
                                 on_start=count_batch)
        self.__dict__["last_backend"] = ran  # a plain attribute: skip nn.Module.__setattr__ on the hot path
        return y

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusedPointwiseBlock(nn.Sequential, _FusedBase):
    """Drop-in for ``nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))``:
    same children ``0``, ``1``, ``2``; forward fused."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, activation: str = "gelu", *,
                 backend: str = "auto", device=None, dtype=None):
        out_dim = dim if out_dim is None else out_dim
        kw = {"device": device, "dtype": dtype}
        super().__init__(nn.Conv2d(dim, out_dim, 1, **kw), make_activation(activation),
                         nn.BatchNorm2d(out_dim, **kw))
        self._init_fused(backend)

    @classmethod
    def from_module(cls, module: nn.Sequential, backend: str = "auto") -> "FusedPointwiseBlock":
        """Wrap an ``nn.Sequential(conv1x1, act, bn)``, sharing (not copying) its children."""
        if isinstance(module, FusedPointwiseBlock):
            module.backend = validate_backend_name(backend)
            return module
        problem = ("not an nn.Sequential of three modules" if not isinstance(module, nn.Sequential)
                   or len(module) != 3 else pointwise_problem(*module))
        if problem is not None:
            raise ValueError(f"cannot fuse {type(module).__name__}: {problem}")
        new = cls.__new__(cls)
        nn.Sequential.__init__(new, *module)
        new._init_fused(backend)
        new.train(module.training)
        return new

    def to_reference(self) -> nn.Sequential:
        return nn.Sequential(*self).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, act, bn = self._modules.values()
        return _pointwise_forward(self, conv, act, bn, x)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusedConvMixerLayer(nn.Sequential, _FusedBase):
    """One ConvMixer layer with the official keys: ``0`` the residual depthwise block (fused when it
    fits), ``1``, ``2``, ``3`` the 1x1 conv, activation and BatchNorm2d run as one fused block."""

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu", *, backend: str = "auto",
                 device=None, dtype=None):
        kw = {"device": device, "dtype": dtype}
        super().__init__(FusedDepthwiseBlock(dim, kernel_size, activation, backend=backend, **kw),
                         nn.Conv2d(dim, dim, 1, **kw), make_activation(activation), nn.BatchNorm2d(dim, **kw))
        self._init_fused(backend)

    @classmethod
    def from_module(cls, module: nn.Sequential, backend: str = "auto") -> "FusedConvMixerLayer":
        """Wrap an official layer ``Sequential(Residual(...), conv1x1, act, bn)``, sharing its children.
        The residual block becomes a FusedDepthwiseBlock when it fits, and stays as it is otherwise."""
        if isinstance(module, FusedConvMixerLayer):
            module.backend = validate_backend_name(backend)
            return module
        problem = ("not an nn.Sequential of four modules" if not isinstance(module, nn.Sequential)
                   or len(module) != 4 else pointwise_problem(*list(module)[1:]))
        if problem is not None:
            raise ValueError(f"cannot fuse {type(module).__name__}: {problem}")
        from .convert import residual_wrapper_problem  # convert imports this module

        first = module[0]
        if (getattr(first, "fn", None) is not None and depthwise_problem(first.fn) is None
                and residual_wrapper_problem(first) is None):  # a layer scale or drop path stays as it is
            first = FusedDepthwiseBlock.from_module(first, backend)
        new = cls.__new__(cls)
        nn.Sequential.__init__(new, first, *list(module)[1:])
        new._init_fused(backend)
        new.train(module.training)
        return new

    def to_reference(self) -> nn.Sequential:
        first = self[0].to_reference() if isinstance(self[0], FusedDepthwiseBlock) else self[0]
        return nn.Sequential(first, *list(self)[1:]).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depthwise, conv, act, bn = self._modules.values()  # not Sequential.__getitem__: the hot path
        return _pointwise_forward(self, conv, act, bn, depthwise(x))

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
