"""Checking a fused model against the reference: the precision rule of design.md section 6.

Run the same steps on three copies of a model: the fused one in dtype d, the
reference in d, and the reference in float64 ("ref64"). Every output, input
gradient, parameter gradient and BatchNorm buffer of the fused copy must satisfy

    ||fused_d - ref64|| <= max(rtol_d * ||ref64||, 2 * ||reference_d - ref64||) + atol_d

norm-wise. ``rtol_d`` is 1e-5 for float32 (tf32 off) and 0 for half types, where
only "no worse than twice PyTorch's own error" counts. The tests and the
``check`` command both use this module.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

RTOL = {torch.float32: 1e-5, torch.float16: 0.0, torch.bfloat16: 0.0, torch.float64: 1e-12}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@dataclass
class Comparison:
    name: str
    err_fused: float
    err_reference: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err_fused <= self.bound  # False for NaN errors too


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double().flatten())) if t.numel() else 0.0


def compare(name: str, fused: torch.Tensor, reference: torch.Tensor, ref64: torch.Tensor,
            dtype: torch.dtype, atol_scale: float = 1.0) -> Comparison:
    """One norm-wise comparison under the precision rule; atol is scaled by sqrt(numel)."""
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    r64 = ref64.double()
    err_f = _norm(fused.double() - r64)
    err_r = _norm(reference.double() - r64)
    bound = max(RTOL[dtype] * _norm(r64), 2.0 * err_r) + ATOL[dtype] * atol_scale * max(fused.numel(), 1) ** 0.5
    return Comparison(name, err_f, err_r, bound)


def snapshot(model: nn.Module, x: torch.Tensor, grad_out_seed: int = 1234) -> Dict[str, torch.Tensor]:
    """Forward, a random-weighted backward, and everything a check compares afterwards.

    The backward seeds with fixed random output weights (never ones, never zeros),
    drawn on the CPU so every copy gets the same ones whatever its device.
    """
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    gen = torch.Generator().manual_seed(grad_out_seed)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    (out * w).sum().backward()
    snap = {"output": out.detach(), "grad_input": x.grad.detach()}
    for name, p in model.named_parameters():
        snap[f"grad {name}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    for name, b in model.named_buffers():
        snap[f"buffer {name}"] = b.detach().clone()
    return snap


def three_copies(reference: nn.Module, make_fused: Callable[[nn.Module], nn.Module], dtype: torch.dtype,
                 device) -> tuple:
    """(fused in dtype, reference in dtype, reference in float64), all from one set of weights."""
    ref_d = copy.deepcopy(reference).to(device=device, dtype=dtype)
    fused_d = make_fused(copy.deepcopy(reference)).to(device=device, dtype=dtype)
    ref64 = copy.deepcopy(reference).to(device=device, dtype=torch.float64)
    return fused_d, ref_d, ref64


def compare_steps(fused: nn.Module, reference: nn.Module, ref64: nn.Module, inputs: List[torch.Tensor],
                  dtype: torch.dtype, autocast: Optional[torch.dtype] = None) -> List[Comparison]:
    """Run one snapshot per input on each copy (training state as the models are); compare all of them.

    With ``autocast`` set, the fused and reference copies run in float32 under
    autocast to that dtype, and the rule's tolerances are those of the autocast dtype.
    """
    rows = []
    for step, x in enumerate(inputs):
        device_type = x.device.type
        ctx = torch.autocast(device_type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            s_fused = snapshot(fused, x.to(dtype))
        with (torch.autocast(device_type, dtype=autocast) if autocast else contextlib.nullcontext()):
            s_ref = snapshot(reference, x.to(dtype))
        s_64 = snapshot(ref64, x.double())
        rule_dtype = autocast or dtype
        for key in s_64:
            rows.append(compare(f"step {step}: {key}", s_fused[key], s_ref[key], s_64[key], rule_dtype))
        for m in (fused, reference, ref64):
            m.zero_grad(set_to_none=True)
    return rows


def compare_train_then_eval(fused: nn.Module, reference: nn.Module, ref64: nn.Module,
                            train_inputs: List[torch.Tensor], eval_inputs: List[torch.Tensor], dtype: torch.dtype,
                            autocast: Optional[torch.dtype] = None) -> List[Comparison]:
    """``compare_steps`` over the training inputs, then all three copies to eval and over the eval inputs."""
    rows = compare_steps(fused, reference, ref64, train_inputs, dtype, autocast)
    for m in (fused, reference, ref64):
        m.eval()
    return rows + compare_steps(fused, reference, ref64, eval_inputs, dtype, autocast)


def format_rows(rows: List[Comparison], only_failures: bool = False) -> str:
    lines = [f"{'':2}{'quantity':<48} {'|fused-ref64|':>13} {'|torch-ref64|':>13} {'bound':>10}"]
    for r in rows:
        if only_failures and r.ok:
            continue
        lines.append(f"{'ok' if r.ok else 'XX'} {r.name:<48.48} {r.err_fused:13.3e} {r.err_reference:13.3e} "
                     f"{r.bound:10.3e}")
    return "\n".join(lines)
