"""The fused layer stack: consecutive ConvMixer layers with every BatchNorm apply folded into the op that
reads its output (design.md 3.3) — the op's contract.

A ConvMixer layer l maps z_{l-1} to z_l:

    a_l = dwconv(z_{l-1}) + b                 s1, t1 from the batch statistics of act(a_l)
    r_l = act(a_l) * s1 + t1 + z_{l-1}
    p_l = r_l W^T + c                         s2, t2 from the batch statistics of act(p_l)
    z_l = act(p_l) * s2 + t2

Per layer the stack stores only a_l and p_l (and per-channel statistics): z_{l-1} is built by layer l's
depthwise conv as it loads p_{l-1} (``prologue.Affine``; the conv's zero padding applies to z), and r_l
by the pointwise GEMM as it loads a_l and p_{l-1} (``prologue.Operand``). The stack's input x (z_{-1})
is a plain tensor and the last z is materialized, so the stack is a drop-in for the layers it replaces.

Backward, layer by layer from the top, with G the gradient with respect to z_l:
  pointwise ``grad_sums(G, p_l)`` -> dgamma2, dbeta2 and the coefficients; ``input_grad`` -> dr = dp W,
  dW = dp^T r_l (r_l rebuilt on load), db; depthwise ``grad_sums(dr, a_l)``; ``input_grad`` (z_{l-1}
  rebuilt on load for dw) -> dr + dwconv^T(da), the gradient with respect to z_{l-1}: the next G.
No batch-statistics term is lost: each BatchNorm's backward runs with its own batch's sums, exactly
as the blocks' ops do, with the same launchers (``depthwise_block.py``, ``pointwise_block.py``).

``memory="lowest"`` stores only p_l and the input; the backward recomputes a_l = dwconv(z_{l-1}) + b (the
cheap depthwise conv, about 5% of the layer's FLOPs) just before it needs it.

Backends: "triton" (both halves Triton), "cuda" (the CUDA extension's depthwise kernels, the Triton
GEMM), and "torch": the same algebra and hand-written backward on ``ops/torch``'s launchers (the
reference the fused ones are tested against; a module on the torch backend runs its layers' reference
composition instead, see ``stack.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from . import batchnorm
from .activation import ACT_CODE
from .alloc import empty_output, output_format
from .batchnorm import BatchNormCall
from .dispatch import common_unsupported, on_device, refuse_double_backward
from .prologue import Affine, Operand

OP = "layer_stack"
MEMORY_MODES = ("low", "lowest")  # low: a_l and p_l per layer; lowest: p_l only
_PER_LAYER = 8  # dw weight, dw bias, bn1 weight, bn1 bias, pw weight, pw bias, bn2 weight, bn2 bias


def kernel_pair(backend: str):
    """(depthwise launchers, pointwise launchers) of a backend; "cuda" runs its GEMMs on Triton."""
    if backend == "torch":
        from .torch import depthwise, pointwise

        return depthwise, pointwise
    return backends.kernels("depthwise_block", backend), backends.kernels("pointwise_block", "triton")


def _present(t: Tensor) -> Optional[Tensor]:
    """The op's lists hold an empty tensor where a parameter is None (no bias, affine=False)."""
    return t if t.numel() > 0 else None


def _rows_as_activation(p: Tensor, N: int, H: int, W: int) -> Tensor:
    """The row-major [M, C] p as the channels_last [N, C, H, W] tensor it is (no copy)."""
    return p.view(N, H, W, p.shape[1]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _Config:
    eps1: Sequence[float]
    eps2: Sequence[float]
    dw_act: Sequence[int]
    pw_act: Sequence[int]
    pads: Sequence[Tuple[int, int]]
    sync_group: str
    folds: "Folds"

    @property
    def depth(self) -> int:
        return len(self.eps1)


def _layer_params(params: Sequence[Tensor], l: int):
    return [_present(t) if i % 2 or i in (2, 6) else t for i, t in enumerate(params[_PER_LAYER * l:_PER_LAYER * (l + 1)])]


def _input(x: Tensor) -> Tensor:
    """The stack's input in the layout its first layer writes (the GEMM reads it as a's residual)."""
    fmt = output_format(x)
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


# ---------------------------------------------------------------------- folds: prologue or apply pass


@dataclass(frozen=True)
class Folds:
    """Which BatchNorm applies a stack builds on load (True) and which it materializes with an apply pass
    into an unsaved temporary (False); the saved tensors are a and p either way.

    conv_input:   z_{l-1} in the depthwise conv's forward prologue, or ``pointwise.apply`` first;
    gemm_operand: r_l in the GEMM's operand prologue (forward and weight gradient), or ``depthwise.apply``;
    wgrad_input:  z_{l-1} in the depthwise weight gradient's prologue, or ``pointwise.apply`` in the backward.
    A prologue saves the apply pass's memory traffic (two to three tensor passes) but recomputes the
    activation for every time the kernel re-reads an element: the conv's halo, the GEMM's column blocks,
    the weight gradient's tap rows. Which wins is per kernel and activation: ``fold_plan`` decides.
    """

    conv_input: bool = True
    gemm_operand: bool = True
    wgrad_input: bool = True

    def as_list(self) -> List[bool]:
        return [self.conv_input, self.gemm_operand, self.wgrad_input]


FOLD_ENV = "CONVMIXER_KERNELS_FOLD"


def fold_plan(backend: str, dw_act: Sequence[int], pw_act: Sequence[int]) -> Folds:
    """The one place the stack's folds are chosen (``CONVMIXER_KERNELS_FOLD`` = prologue / apply forces them).

    From the static sm_90 evidence at ConvMixer-1536/20 k9, batch 64, bf16 (``convmixer-kernels inspect``;
    predictions, not measurements): the Triton conv's prologue costs +98 us (ReLU) to +470 us (GELU) against
    ~94 us for the apply pass it replaces (its 8x8-tile halo re-stages each element ~4x); the weight
    gradient's costs +0.8 to +3.3 ms (each x band re-staged per tap row, ~11x); the GEMM operand prologue
    recomputes act(a) once per column block and, at M = 65536, C = 1536, spills 452-980 B in the forward
    (128-register cap) and takes the weight gradient from 105 to 174-245 registers. So the Triton stack
    materializes all three; the torch
    launchers fold everything (they are the algebra's reference). The CUDA extension's depthwise kernels
    follow the Triton choice (their staging re-reads the halo the same way).
    """
    forced = os.environ.get(FOLD_ENV, "auto")
    if forced == "prologue":
        return Folds(True, True, True)
    if forced == "apply":
        return Folds(False, False, False)
    if forced != "auto":
        raise ValueError(f"{FOLD_ENV}={forced!r}: choose auto, prologue or apply")
    if backend == "torch":
        return Folds(True, True, True)
    return Folds(False, False, False)


@dataclass(frozen=True)
class _Input:
    """A layer's input z_{l-1}: ``view`` (p_{l-1} as [N, C, H, W], or the stack's input) with ``affine``
    (p_{l-1}'s BatchNorm apply; None for the stack's input, which is z itself); ``rows`` is p_{l-1} [M, C]."""

    view: Tensor
    affine: Optional[Affine] = None
    rows: Optional[Tensor] = None

    def materialized(self, kp) -> Tensor:
        if self.affine is None:
            return self.view
        return kp.apply(self.rows, self.view, self.affine.finalized, self.affine.act)

    def source(self, kp, fold: bool) -> Tuple[Tensor, Optional[Affine]]:
        """(tensor, prologue) a kernel reads z from: the stored p with its apply as a prologue when
        ``fold``, else the materialized z."""
        if fold or self.affine is None:
            return self.view, self.affine
        return self.materialized(kp), None


def _gemm_input(kd, a: Tensor, fin1: Tensor, act: int, z: Tensor, z_affine: Optional[Affine], fold: bool, kp,
                inp: _Input):
    """(tensor, operand prologue) the GEMM reads r = act(a) s1 + t1 + z from."""
    if fold:
        return a, Operand(Affine(fin1, act), residual=z, residual_affine=z_affine)
    if z_affine is not None:  # the depthwise apply adds a materialized z
        z = inp.materialized(kp)
    return kd.apply(a, z, fin1, act), None


def _layer_forward(kd, kp, inp: _Input, lp, cfg: _Config, l: int, keep_a: bool):
    """One layer's training forward: (a, p, stats1, stats2)."""
    w_dw, b_dw, g1, be1, w_pw, b_pw, g2, be2 = lp
    z, z_affine = inp.source(kp, cfg.folds.conv_input)
    a, part1 = kd.conv_stats(z, w_dw, b_dw, cfg.dw_act[l], cfg.pads[l], prologue=z_affine)
    fin1 = batchnorm.batch_statistics(kd, part1, g1, be1, cfg.eps1[l], cfg.sync_group)
    src, operand = _gemm_input(kd, a, fin1, cfg.dw_act[l], z, z_affine, cfg.folds.gemm_operand, kp, inp)
    p, part2 = kp.linear(src, w_pw, b_pw, cfg.pw_act[l], True, prologue=operand)
    fin2 = batchnorm.batch_statistics(kp, part2, g2, be2, cfg.eps2[l], cfg.sync_group)
    return (a if keep_a else None), p, fin1, fin2


def _stack_forward(kd, kp, x: Tensor, params: Sequence[Tensor], cfg: _Config, keep_a: bool):
    """-> (z, [a_l], [p_l], stats [L, 2, 6, C])."""
    N, _, H, W = x.shape
    inp = _Input(x)
    a_list, p_list, stats = [], [], []
    for l in range(cfg.depth):
        a, p, fin1, fin2 = _layer_forward(kd, kp, inp, _layer_params(params, l), cfg, l, keep_a)
        if keep_a:
            a_list.append(a)
        p_list.append(p)
        stats.append(torch.stack((fin1, fin2)))
        inp = _Input(_rows_as_activation(p, N, H, W), Affine(fin2, cfg.pw_act[l]), p)
    z = kp.apply(p_list[-1], x, stats[-1][1], cfg.pw_act[-1])
    return z, a_list, p_list, torch.stack(stats)


# ====================================================================== the op contract


@torch.library.custom_op("convmixer_kernels::layer_stack_fwd", mutates_args=())
def _fwd_op(x: Tensor, params: List[Tensor], eps1: List[float], eps2: List[float], dw_act: List[int],
            pw_act: List[int], pad_top: List[int], pad_left: List[int], folds: List[bool], store: bool, memory: str,
            backend: str, sync_group: str) -> Tuple[Tensor, List[Tensor], Tensor]:
    """-> (z, saved, stats): z the last layer's output in x's layout; saved = [a_0, p_0, a_1, p_1, ...]
    (``memory="lowest"``: [p_0, p_1, ...]; empty unless ``store``); stats [L, 2, 6, C] the finalized batch
    statistics of each layer's two BatchNorms. Reads, never writes, the running buffers."""
    kd, kp = kernel_pair(backend)
    cfg = _Config(eps1, eps2, dw_act, pw_act, list(zip(pad_top, pad_left)), sync_group, Folds(*folds))
    with on_device(x):
        z, a_list, p_list, stats = _stack_forward(kd, kp, _input(x), params, cfg, keep_a=memory == "low")
    if not store:
        return z, [], stats
    saved = [t for pair in zip(a_list, p_list) for t in pair] if memory == "low" else p_list
    return z, saved, stats


@_fwd_op.register_fake
def _(x, params, eps1, eps2, dw_act, pw_act, pad_top, pad_left, folds, store, memory, backend, sync_group):
    N, C, H, W = x.shape
    L = len(eps1)
    z = x.new_empty(x.shape).contiguous(memory_format=output_format(x))
    saved = []
    if store:
        for l in range(L):
            if memory == "low":
                src = x if l == 0 else _rows_as_activation(x.new_empty((N * H * W, C)), N, H, W)
                saved.append(empty_output(src))
            saved.append(x.new_empty((N * H * W, C)))
    return z, saved, x.new_empty((L, 2, 6, C), dtype=torch.float32)


def _layer_backward(kd, kp, G: Tensor, inp: _Input, a: Optional[Tensor], p: Tensor, fin1: Tensor, fin2: Tensor,
                    lp, cfg: _Config, l: int, need_dx: bool) -> Tuple[Tensor, List[Tensor]]:
    """One layer's backward from G = dL/dz_l: (dL/dz_{l-1}, its 8 parameter gradients)."""
    w_dw, b_dw, g1, _, w_pw, b_pw, g2, _ = lp
    dw_act, pw_act = cfg.dw_act[l], cfg.pw_act[l]
    grads: List[Tensor] = [p.new_empty(0)] * _PER_LAYER
    z, z_affine = inp.source(kp, cfg.folds.wgrad_input and cfg.folds.gemm_operand)
    if a is None:  # memory="lowest": the depthwise conv again, on the same input as the forward's
        a, _ = kd.conv_stats(z, w_dw, b_dw, dw_act, cfg.pads[l], prologue=z_affine)
    # pointwise half: G is the gradient with respect to z_l = act(p_l) s2 + t2
    sums2 = kp.grad_sums(G, p, fin2, pw_act)
    grads[6], grads[7] = sums2[1].clone(), sums2[0].clone()
    coef2 = batchnorm.backward_coefficients(sums2, fin2, g2, True, cfg.sync_group)
    src, operand = _gemm_input(kd, a, fin1, dw_act, z, z_affine, cfg.folds.gemm_operand, kp, inp)
    dr, grads[4], db = kp.input_grad(G, p, src, w_pw, coef2, pw_act, True, True, True, b_pw is not None,
                                     prologue=operand)
    if b_pw is not None:
        grads[5] = db
    # depthwise half: dr is the gradient with respect to r_l = act(a_l) s1 + t1 + z_{l-1}
    sums1 = kd.grad_sums(dr, a, fin1, dw_act)
    grads[2], grads[3] = sums1[1].clone(), sums1[0].clone()
    coef1 = batchnorm.backward_coefficients(sums1, fin1, g1, True, cfg.sync_group)
    G, grads[0], db = kd.input_grad(dr, a, z, w_dw, coef1, dw_act, cfg.pads[l], True, need_dx, True,
                                    b_dw is not None, prologue=z_affine)
    if b_dw is not None:
        grads[1] = db
    return G, grads


@torch.library.custom_op("convmixer_kernels::layer_stack_bwd", mutates_args=())
def _bwd_op(dz: Tensor, x: Tensor, saved: List[Tensor], stats: Tensor, params: List[Tensor], dw_act: List[int],
            pw_act: List[int], pad_top: List[int], pad_left: List[int], folds: List[bool], need_dx: bool,
            memory: str, backend: str, sync_group: str) -> Tuple[Tensor, List[Tensor]]:
    """-> (dx, grads): grads has one entry per ``params`` entry (float32 for the BatchNorm parameters,
    the parameter's dtype otherwise; empty where the parameter is absent)."""
    kd, kp = kernel_pair(backend)
    L = len(dw_act)
    cfg = _Config([0.0] * L, [0.0] * L, dw_act, pw_act, list(zip(pad_top, pad_left)), sync_group, Folds(*folds))
    x = _input(x)
    N, _, H, W = x.shape
    per = 2 if memory == "low" else 1
    p_of = lambda l: saved[per * l + per - 1]  # noqa: E731
    grads: List[Tensor] = []
    with on_device(x):
        G = dz
        for l in reversed(range(L)):
            inp = _Input(x) if l == 0 else _Input(_rows_as_activation(p_of(l - 1), N, H, W),
                                                  Affine(stats[l - 1, 1], pw_act[l - 1]), p_of(l - 1))
            a = saved[2 * l] if memory == "low" else None
            G, layer_grads = _layer_backward(kd, kp, G, inp, a, p_of(l), stats[l, 0], stats[l, 1],
                                             _layer_params(params, l), cfg, l, l > 0 or need_dx)
            grads = layer_grads + grads
    return (G if need_dx else x.new_empty(0)), grads


@_bwd_op.register_fake
def _(dz, x, saved, stats, params, dw_act, pw_act, pad_top, pad_left, folds, need_dx, memory, backend, sync_group):
    dx = x.new_empty(x.shape).contiguous(memory_format=output_format(x)) if need_dx else x.new_empty(0)
    grads = []
    for i, t in enumerate(params):
        if t.numel() == 0:
            grads.append(x.new_empty(0))
        elif i % _PER_LAYER in (2, 3, 6, 7):
            grads.append(x.new_empty(t.shape, dtype=torch.float32))
        else:
            grads.append(t.new_empty(t.shape))
    return dx, grads


def _setup_context(ctx, inputs, output):
    x, params, _, _, dw_act, pw_act, pad_top, pad_left, folds, store, memory, backend, sync_group = inputs
    _, saved, stats = output
    ctx.mark_non_differentiable(*saved, stats)
    ctx.save_for_backward(x, stats, *params, *saved)
    ctx.n_params = len(params)
    ctx.config = (list(dw_act), list(pw_act), list(pad_top), list(pad_left), list(folds), store, memory, backend,
                  sync_group)
    ctx.need = [x.requires_grad] + [t.requires_grad for t in params]
    ctx.dtypes = [t.dtype for t in params]


def _backward(ctx, dz, _dsaved, _dstats):
    dw_act, pw_act, pad_top, pad_left, folds, store, memory, backend, sync_group = ctx.config
    x, stats, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
    if not store:
        raise RuntimeError("layer_stack: the forward ran without keeping its tensors (no input required grad "
                           "then), so it cannot be differentiated")
    refuse_double_backward(OP, backend, dz)
    dx, grads = torch.ops.convmixer_kernels.layer_stack_bwd(
        dz, x, list(saved), stats, list(params), dw_act, pw_act, pad_top, pad_left, folds, ctx.need[0], memory,
        backend, sync_group)
    out = [g.to(dt) if need and g.numel() > 0 else None for g, need, dt in zip(grads, ctx.need[1:], ctx.dtypes)]
    return (dx if ctx.need[0] else None), out, *([None] * 11)  # eps1 .. sync_group


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ====================================================================== the fused entry point


@dataclass
class StackLayer:
    """One layer's parameters and BatchNorm calls, as the modules hand them to the stack."""

    dw_weight: Tensor
    dw_bias: Optional[Tensor]
    bn1: BatchNormCall
    pw_weight: Tensor
    pw_bias: Optional[Tensor]
    bn2: BatchNormCall
    dw_activation: str
    pw_activation: str
    padding: object  # the depthwise conv's padding ("same" or a symmetric (ph, pw))


def _flat_params(layers: Sequence[StackLayer], x: Tensor) -> List[Tensor]:
    none = x.new_empty(0)
    out = []
    for ly in layers:
        for t in (ly.dw_weight, ly.dw_bias, ly.bn1.weight, ly.bn1.bias, ly.pw_weight, ly.pw_bias, ly.bn2.weight,
                  ly.bn2.bias):
            out.append(none if t is None else t)
    return out


def layer_stack_fused(x: Tensor, layers: Sequence[StackLayer], *, backend: str, memory: str = "low",
                      sync_group: Optional[str] = None) -> Tensor:
    """Run ``layers`` (every BatchNorm with batch statistics) as one fused stack on ``backend``; the running
    buffers are updated in place, once per BatchNorm, as the reference does."""
    from .depthwise_block import same_padding

    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}: choose one of {MEMORY_MODES}")
    if not layers:
        raise ValueError("layer_stack: no layers")
    pads = [same_padding(ly.padding, tuple(ly.dw_weight.shape[-2:])) for ly in layers]
    params = _flat_params(layers, x)
    store = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
    dw_act = [ACT_CODE[ly.dw_activation] for ly in layers]
    pw_act = [ACT_CODE[ly.pw_activation] for ly in layers]
    z, _, stats = torch.ops.convmixer_kernels.layer_stack_fwd(
        x, params, [float(ly.bn1.eps) for ly in layers], [float(ly.bn2.eps) for ly in layers], dw_act, pw_act,
        [p[0] for p in pads], [p[1] for p in pads], fold_plan(backend, dw_act, pw_act).as_list(), store, memory,
        backend, sync_group or "")
    if x.numel() > 0:
        for l, ly in enumerate(layers):
            batchnorm.update_running_stats(ly.bn1, stats[l, 0])
            batchnorm.update_running_stats(ly.bn2, stats[l, 1])
        if store and any(ly.bn1.running_mean is not None for ly in layers):
            z = batchnorm.saved_after_update(z, stats)  # activation checkpointing recomputes the updates too
    return z


def layer_stack_reference(x: Tensor, layers: Sequence[StackLayer], *, memory: str = "low",
                          sync_group: Optional[str] = None) -> Tensor:
    """The unfused composition of the layers, op for op as the reference modules run them."""
    from .depthwise_block import depthwise_block_reference
    from .pointwise_block import pointwise_block_reference

    for ly in layers:
        b1, b2 = ly.bn1, ly.bn2
        y = depthwise_block_reference(x, ly.dw_weight, ly.dw_bias, b1.weight, b1.bias, b1.running_mean,
                                      b1.running_var, b1.use_batch_stats, b1.momentum, b1.eps,
                                      activation=ly.dw_activation, padding=ly.padding, sync_group=sync_group)
        x = pointwise_block_reference(y, ly.pw_weight, ly.pw_bias, b2.weight, b2.bias, b2.running_mean,
                                      b2.running_var, b2.use_batch_stats, b2.momentum, b2.eps,
                                      activation=ly.pw_activation, sync_group=sync_group)
    return x


def unsupported(x: Tensor, layers: Sequence[StackLayer], compute_dtype, **config) -> Optional[str]:
    """The stack's own limits (each backend's depthwise launchers add theirs through the registry)."""
    from .depthwise_block import same_padding

    reason = common_unsupported(x=x, compute_dtype=compute_dtype, residual=True)
    if reason:
        return reason
    C = x.shape[1]
    for l, ly in enumerate(layers):
        if ly.dw_activation not in ACT_CODE or ly.pw_activation not in ACT_CODE:
            return f"layer {l}: activation {ly.dw_activation!r}/{ly.pw_activation!r} has no fused kernel"
        if tuple(ly.dw_weight.shape) != (C, 1) + tuple(ly.dw_weight.shape[2:]) or \
                tuple(ly.pw_weight.shape) != (C, C, 1, 1):
            return (f"layer {l}: weights {tuple(ly.dw_weight.shape)} and {tuple(ly.pw_weight.shape)} do not map "
                    f"{C} channels to {C}")
        try:
            same_padding(ly.padding, tuple(ly.dw_weight.shape[-2:]))
        except ValueError as e:
            return f"layer {l}: {e}"
        for bn in (ly.bn1, ly.bn2):
            if not bn.use_batch_stats:
                return f"layer {l}: a BatchNorm uses running statistics (eval): the layers run one by one"
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                if t is not None and (t.dim() != 1 or t.shape[0] != C or not t.is_floating_point()):
                    return f"layer {l}: a BatchNorm tensor of shape {tuple(t.shape)} does not fit {C} channels"
        for t in (ly.dw_weight, ly.dw_bias, ly.pw_weight, ly.pw_bias):
            if t is not None and t.device != x.device:
                return f"layer {l}: a parameter is on {t.device}, the input on {x.device}"
    return None


backends.register_op(OP, reference=layer_stack_reference, fused=layer_stack_fused, unsupported=unsupported,
                     kernels={"triton": "convmixer_kernels.ops.triton.depthwise",
                              "cuda": "convmixer_kernels.ops.cuda.depthwise"})
