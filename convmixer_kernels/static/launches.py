"""The one adapter between ``inspect`` and the package's Triton launchers.

Under ``recording()`` every ``JITFunction.run`` (what ``kernel[grid](...)`` calls) is replaced:
the launch is bound and specialized exactly as Triton would for an sm_90 target (the same
binder, the same ``_pack_args``: signature, constexprs, divisibility attributes, num_warps,
num_stages) and recorded instead of launched. The launchers are then run on ``meta`` tensors at
the workload's shape, so grids and configurations are those the package picks on an H200.

Two layouts of ``convmixer_kernels.ops`` are known (re-point here, nowhere else):

* the op-contract layout (``ops/triton/common.py`` has ``static_target``): launchers run inside
  ``static_target(sms=132)``, which makes them pick CUDA configurations for meta tensors;
* the earlier layout (``ops/depthwise_block.py`` / ``ops/pointwise_block.py`` hold the kernels):
  the few policy hooks those files read (interpreting?, autotune?, SM count, finalize on CUDA)
  are patched for the duration of the capture.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .ceilings import H200



@dataclass
class TensorArg:
    shape: Tuple[int, ...]
    dtype: str
    nbytes: int
    storage: int  # identity of the underlying storage (a dummy passed twice is one tensor)


@dataclass
class Launch:
    kernel: str
    phase: str  # e.g. "dw_block forward (training)"
    grid: Tuple[int, int, int]
    num_warps: int
    num_stages: int
    constexprs: Dict[str, Any]
    args: Dict[str, Any]  # name -> int / float / bool / TensorArg
    candidate: bool = False  # recorded while enumerating autotune candidates (--all-configs)
    compile_inputs: Tuple = field(default=(), repr=False)  # (fn, signature, constexprs, attrs, options dict)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def key(self) -> tuple:
        return (self.kernel, tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())), self.num_warps,
                self.num_stages, tuple(sorted((k, v.dtype) for k, v in self.args.items() if isinstance(v, TensorArg))))


class _Recorder:
    def __init__(self):
        self.launches: List[Launch] = []
        self.phase = ""
        self.candidate = False


def _storage_id(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:
        return id(t)


@contextlib.contextmanager
def recording():
    """Record Triton launches (compile inputs for sm_90) instead of running them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as jit_mod

    backend = make_backend(GPUTarget("cuda", H200.capability, 32))
    rec = _Recorder()
    binders: Dict[int, Callable] = {}
    original = jit_mod.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = binders.get(id(self))
        if binder is None:
            binder = binders[id(self)] = jit_mod.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        if callable(grid):
            grid = grid(bound)
        g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
        names = list(bound)
        cx = {names[path[0]]: val for path, val in constexprs.items() if len(path) == 1}
        described = {}
        for name, val in bound.items():
            if name in cx:
                continue
            if isinstance(val, torch.Tensor):
                described[name] = TensorArg(tuple(val.shape), str(val.dtype).replace("torch.", ""),
                                            val.numel() * val.element_size(), _storage_id(val))
            elif isinstance(val, (int, float, bool)):
                described[name] = val
        rec.launches.append(Launch(self.fn.__name__, rec.phase, g, opts.num_warps, opts.num_stages, cx, described,
                                   rec.candidate, (self, signature, constexprs, attrs, opts.__dict__)))
        return None

    jit_mod.JITFunction.run = run
    try:
        yield rec
    finally:
        jit_mod.JITFunction.run = original


# ------------------------------------------------------------------ the launchers, per layout


def _layout():
    """The Triton backend's plumbing and the two ops' launcher modules (the op contract)."""
    common = importlib.import_module("convmixer_kernels.ops.triton.common")
    dw = importlib.import_module("convmixer_kernels.ops.triton.depthwise")
    pw = importlib.import_module("convmixer_kernels.ops.triton.pointwise")
    return common, dw, pw


@contextlib.contextmanager
def _patched(obj, name, value):
    if not hasattr(obj, name):
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def sm90_policy(rec: _Recorder, all_configs: bool):
    """Launchers pick what they would on an H200 (``ops/triton/common.static_target``); with
    ``all_configs`` every autotune candidate is launched (recorded as a candidate) before the default."""
    common, dw, pw = _layout()
    with contextlib.ExitStack() as stack:
        stack.enter_context(common.static_target())
        if all_configs:
            def pick(self, key, candidates, launch, timer=None):
                _enumerate(rec, candidates, launch)
                return candidates[0]

            stack.enter_context(_patched(common.Autotuner, "pick", pick))
        yield dw, pw


def _enumerate(rec: _Recorder, candidates, launch) -> None:
    rec.candidate = True
    try:
        for cand in candidates[1:]:
            launch(cand)
    finally:
        rec.candidate = False


# ------------------------------------------------------------------ one block's launches


@dataclass(frozen=True)
class Shape:
    batch: int
    dim: int
    size: int  # H = W of the layer's grid
    kernel_size: int
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = True
    activation: str = "gelu"

    @property
    def unit_bytes(self) -> int:
        return self.batch * self.dim * self.size * self.size * torch.empty((), dtype=self.dtype).element_size()


PHASES = {
    "dw_block": ("forward (training)", "forward (eval)", "backward"),
    "pw_block": ("forward (training)", "forward (eval)", "backward"),
    # one interior layer of the fused layer stack (ops/layer_stack.py): BatchNorm applies folded into prologues
    "layer_stack": ("forward (training)", "backward", "backward (memory=lowest)"),
}


def capture(op: str, s: Shape, phases=None, all_configs: bool = False) -> List[Launch]:
    """Every launch the Triton backend makes for ``op`` ("dw_block" or "pw_block") at ``s``: the contract's
    launchers (ops/depthwise_block.py, ops/pointwise_block.py) composed as the ops compose them."""
    from convmixer_kernels.ops.activation import ACT_CODE

    phases = phases or PHASES[op]
    if op == "layer_stack":
        return _capture_stack_layer(s, phases, all_configs)
    meta = dict(device="meta")
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    N, C, H, k = s.batch, s.dim, s.size, s.kernel_size
    act = ACT_CODE[s.activation]
    x = torch.empty(N, C, H, H, dtype=s.dtype, **meta).contiguous(memory_format=fmt)
    f32 = lambda *shape: torch.empty(*shape, dtype=torch.float32, **meta)  # noqa: E731
    with recording() as rec, sm90_policy(rec, all_configs) as (dw, pw), torch.no_grad():
        b = torch.empty(C, dtype=s.dtype, **meta)
        if op == "dw_block":
            w = torch.empty(C, 1, k, k, dtype=s.dtype, **meta)
            pads = ((k - 1) // 2, (k - 1) // 2)
            for phase in phases:
                rec.phase = f"dw_block {phase}"
                if phase == "forward (training)":
                    a, part = dw.conv_stats(x, w, b, act, pads)
                    dw.apply(a, x, dw.finalize(part, f32(C), f32(C), 1e-5), act)
                elif phase == "forward (eval)":
                    dw.conv_apply(x, w, b, f32(6, C), act, pads, False)
                else:
                    dy, a = torch.empty_like(x), torch.empty_like(x)
                    dw.grad_sums(dy, a, f32(6, C), act)
                    dw.input_grad(dy, a, x, w, f32(4, C), act, pads, True, True, True, True)
        else:
            w = torch.empty(C, C, 1, 1, dtype=s.dtype, **meta)
            M = N * H * H
            for phase in phases:
                rec.phase = f"pw_block {phase}"
                if phase == "forward (training)":
                    p, part = pw.linear(x, w, b, act, True)
                    pw.apply(p, x, pw.finalize(part, f32(C), f32(C), 1e-5), act)
                elif phase == "forward (eval)":
                    pw.linear_apply(x, w, b, f32(6, C), act)
                else:
                    dz = torch.empty_like(x)
                    p = torch.empty(M, C, dtype=s.dtype, **meta)
                    pw.grad_sums(dz, p, f32(6, C), act)
                    pw.input_grad(dz, p, x, w, f32(4, C), act, True, True, True, True)
    return rec.launches


def _capture_stack_layer(s: Shape, phases, all_configs: bool) -> List[Launch]:
    """One interior layer of the fused stack, run by ``ops/layer_stack.py``'s own layer functions with the
    folds the Triton stack uses (``fold_plan``): its input is the previous layer's p (row-major [M, C], read as
    channels_last) with that BatchNorm's apply, built on load or by an apply pass."""
    from convmixer_kernels.ops import layer_stack as ls
    from convmixer_kernels.ops.activation import ACT_CODE
    from convmixer_kernels.ops.prologue import Affine

    meta = dict(device="meta")
    N, C, H, k = s.batch, s.dim, s.size, s.kernel_size
    M = N * H * H
    act = ACT_CODE[s.activation]
    f32 = lambda *shape: torch.empty(*shape, dtype=torch.float32, **meta)  # noqa: E731
    pads = ((k - 1) // 2, (k - 1) // 2)
    cfg = ls._Config([1e-5], [1e-5], [act], [act], [pads], "", ls.fold_plan("triton", [act], [act]))
    with recording() as rec, sm90_policy(rec, all_configs) as (dw, pw), torch.no_grad():
        prev_p = torch.empty(M, C, dtype=s.dtype, **meta)
        inp = ls._Input(ls._rows_as_activation(prev_p, N, H, H), Affine(f32(6, C), act), prev_p)
        lp = [torch.empty(C, 1, k, k, dtype=s.dtype, **meta), torch.empty(C, dtype=s.dtype, **meta), f32(C), f32(C),
              torch.empty(C, C, 1, 1, dtype=s.dtype, **meta), torch.empty(C, dtype=s.dtype, **meta), f32(C), f32(C)]
        for phase in phases:
            rec.phase = f"layer_stack {phase}"
            if phase == "forward (training)":
                ls._layer_forward(dw, pw, inp, lp, cfg, 0, True)
            else:
                a = None if phase == "backward (memory=lowest)" else torch.empty_like(inp.view)
                G = torch.empty_like(inp.view)
                p = torch.empty(M, C, dtype=s.dtype, **meta)
                ls._layer_backward(dw, pw, G, inp, a, p, f32(6, C), f32(6, C), lp, cfg, 0, True)
    return rec.launches


def stack_saved(s: Shape, memory: str = "low", depth: int = 3) -> Tuple[int, int]:
    """(bytes, tensors) per layer that a ``depth``-layer fused stack keeps for its backward at ``s`` (meta tensors,
    nothing launched: the op's fake runs), the stack's input included once and spread over the layers."""
    from .traffic import saved_bytes

    from convmixer_kernels.ops.batchnorm import BatchNormCall
    from convmixer_kernels.ops.layer_stack import StackLayer, layer_stack_fused

    meta = dict(device="meta")
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    N, C, H, k = s.batch, s.dim, s.size, s.kernel_size
    x = torch.empty(N, C, H, H, dtype=s.dtype, **meta).contiguous(memory_format=fmt).requires_grad_(True).clone()
    params, layers = [], []
    for _ in range(depth):
        t = lambda *shape, dt=s.dtype: torch.empty(*shape, dtype=dt, **meta).requires_grad_(True)  # noqa: E731
        w_dw, b_dw, w_pw, b_pw = t(C, 1, k, k), t(C), t(C, C, 1, 1), t(C)
        bns = [BatchNormCall(t(C, dt=torch.float32), t(C, dt=torch.float32), torch.empty(C, **meta),
                             torch.empty(C, **meta), True, 0.1, 1e-5) for _ in range(2)]
        layers.append(StackLayer(w_dw, b_dw, bns[0], w_pw, b_pw, bns[1], s.activation, s.activation, "same"))
        params += [w_dw, b_dw, w_pw, b_pw] + [p for bn in bns for p in (bn.weight, bn.bias, bn.running_mean,
                                                                         bn.running_var)]
    with recording() as rec, sm90_policy(rec, False):
        nbytes, count = saved_bytes(lambda: layer_stack_fused(x, layers, backend="triton", memory=memory),
                                    exclude=tuple(params))
    return nbytes / depth, count / depth


def fused_saved(op: str, s: Shape) -> Tuple[int, int]:
    """(bytes, tensors) the Triton backend's autograd formula saves for ``op`` at ``s`` (meta tensors,
    launches recorded, not run); parameters and BatchNorm buffers excluded."""
    from .traffic import saved_bytes

    import functools

    from convmixer_kernels.ops import depthwise_block, pointwise_block

    fused = depthwise_block.depthwise_block_fused if op == "dw_block" else pointwise_block.pointwise_block_fused
    fn = functools.partial(fused, backend="triton")
    meta = dict(device="meta")
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    N, C, H, k = s.batch, s.dim, s.size, s.kernel_size
    x = torch.empty(N, C, H, H, dtype=s.dtype, **meta).contiguous(memory_format=fmt).requires_grad_(True).clone()
    shape_w = (C, 1, k, k) if op == "dw_block" else (C, C, 1, 1)
    params = [torch.empty(shape_w, dtype=s.dtype, **meta).requires_grad_(True),
              torch.empty(C, dtype=s.dtype, **meta).requires_grad_(True),
              torch.empty(C, **meta).requires_grad_(True), torch.empty(C, **meta).requires_grad_(True)]
    buffers = [torch.empty(C, **meta), torch.empty(C, **meta)]
    kwargs = dict(activation=s.activation)
    if op == "dw_block":
        kwargs["padding"] = "same"
    with recording() as rec, sm90_policy(rec, False):
        return saved_bytes(lambda: fn(x, *params, *buffers, True, 0.1, 1e-5, **kwargs), exclude=tuple(params + buffers))
