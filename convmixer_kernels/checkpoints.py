"""State-dict layouts: the official ``nn.Sequential`` keys and timm's ``ConvMixer`` keys.

Keys saved from a DDP-wrapped model (``module.*``) or a compiled one (``_orig_mod.*``) are
accepted in either layout; the prefix is dropped.

Official: ``0.*`` patch conv, ``2.*`` its BatchNorm, ``{3+i}.*`` layer i, ``{depth+5}.*`` the head.
timm:     ``stem.0.*``, ``stem.2.*``, ``blocks.{i}.*``, ``head.*`` (same parameters, same order).
Both load into ``ConvMixer(...)`` (fused or not) after ``to_official_layout``.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping


# wrappers that prefix every key: DDP / DataParallel ("module."), torch.compile ("_orig_mod.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefix(state_dict: Mapping[str, object]) -> "OrderedDict[str, object]":
    """The state_dict without a ``module.`` (DDP, DataParallel) or ``_orig_mod.`` (torch.compile)
    prefix that *every* key carries (repeatedly: a compiled DDP model has both)."""
    out = OrderedDict(state_dict)
    while out:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None:
            break
        out = OrderedDict((k[len(prefix):], v) for k, v in out.items())
    return out


def layout_of(state_dict: Mapping[str, object]) -> str:
    """"official" or "timm" (ValueError for anything else). A ``module.``/``_orig_mod.`` prefix on
    every key is ignored; a timm state_dict without ``head.*`` (``num_classes=0``) is "timm"."""
    keys = list(strip_wrapper_prefix(state_dict))
    if any(k.startswith("stem.") for k in keys) and any(k.startswith(("blocks.", "head.")) for k in keys):
        return "timm"
    if keys and all(re.match(r"^\d+\.", k) for k in keys):
        return "official"
    raise ValueError("state_dict is neither in the official ConvMixer layout (keys '0.weight', '3.0.fn.0.weight', "
                     "...) nor in timm's ('stem.0.weight', 'blocks.0.0.fn.0.weight', 'head.weight', ...)")


def _depth_from_timm(state_dict) -> int:
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def to_official_layout(state_dict: Mapping[str, object]) -> "OrderedDict[str, object]":
    """The state_dict with official keys (returned as is, copied, if already official).

    A DDP ``module.`` (or torch.compile ``_orig_mod.``) prefix is removed. A headless timm
    state_dict (``num_classes=0``: no ``head.*``) gives one without the head's keys, which loads
    into ``ConvMixer(...)`` with ``strict=False`` (only the head missing).
    """
    state_dict = strip_wrapper_prefix(state_dict)
    if layout_of(state_dict) == "official":
        return state_dict
    depth = _depth_from_timm(state_dict)
    out = OrderedDict()
    for k, v in state_dict.items():
        if k.startswith("stem."):
            out[k[len("stem."):]] = v
        elif k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            out[f"{3 + int(i)}.{rest}"] = v
        elif k.startswith("head."):
            out[f"{depth + 5}.{k[len('head.'):]}"] = v
        else:
            raise ValueError(f"unexpected key {k!r} in a timm ConvMixer state_dict")
    return out


def to_timm_layout(state_dict: Mapping[str, object]) -> "OrderedDict[str, object]":
    """The state_dict with timm's keys (returned as is, copied, if already timm's; a DDP ``module.``
    prefix is removed)."""
    state_dict = strip_wrapper_prefix(state_dict)
    if layout_of(state_dict) == "timm":
        return state_dict
    top = max(int(k.split(".", 1)[0]) for k in state_dict)  # the head's index, depth + 5
    out = OrderedDict()
    for k, v in state_dict.items():
        i, rest = k.split(".", 1)
        i = int(i)
        if i < 3:
            out[f"stem.{i}.{rest}"] = v
        elif i == top:
            out[f"head.{rest}"] = v
        else:
            out[f"blocks.{i - 3}.{rest}"] = v
    return out
