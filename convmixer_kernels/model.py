"""The ConvMixer model builder, in the official layout (design.md section 1)."""
from __future__ import annotations

from torch import nn

from .convert import fuse_convmixer
from .modules import Residual
from .ops.activation import make_activation


def ConvMixer(dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, n_classes: int = 1000, *,
              in_chans: int = 3, activation: str = "gelu", fused: bool = False, backend: str = "auto",
              memory: str = "normal") -> nn.Sequential:
    """ConvMixer-``dim``/``depth`` as one ``nn.Sequential`` with the official state_dict keys.

    ``activation`` is "gelu", "gelu_tanh" or "relu" (used everywhere, stem included).
    ``fused=True`` swaps in the fused layers and makes the model a ``FusedSequential``; the keys, the
    initialization (same random draws) and the function computed stay the same. ``memory`` is what a
    training step keeps for the backward: "normal" (block by block, the fastest), "low" (the layers as
    one fused stack keeping a and p per layer) or "lowest" (p only; the depthwise conv recomputed).
    """
    model = nn.Sequential(
        nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
        make_activation(activation),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                make_activation(activation),
                nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1),
            make_activation(activation),
            nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )
    if fused:
        model = fuse_convmixer(model, backend=backend, memory=memory)
    return model
