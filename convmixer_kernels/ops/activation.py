"""Activations a fused block may use: GELU (erf), GELU (tanh) and ReLU.

This file is the module side (names, nn.Modules, the PyTorch reference); the
Triton device functions every kernel shares (``act_fwd``, ``act_grad``, selected
by the ``ACT_CODE`` constexpr) are in ``activation_triton.py``, so the torch path
never imports triton.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
# The code a kernel takes for each activation: Triton's ACT constexpr and cmk::Act in csrc/kernels/params.h.
ACT_CODE = {"gelu": 0, "gelu_tanh": 1, "relu": 2}


def make_activation(name: str) -> nn.Module:
    """The nn.Module the official model uses for ``name``."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def activation_name(module: nn.Module) -> Optional[str]:
    """The name of a supported activation module, or None if it is not one we fuse."""
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if type(module) is nn.ReLU:
        return "relu"
    return None


def activation_reference(t: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu(t)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
