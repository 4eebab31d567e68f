"""Stand-ins for the two outside ConvMixer implementations the converter must handle.

Written here to the same module structure (so the same state_dict keys and the
same forward), not copied: the official code's single ``nn.Sequential`` with its
own ``Residual`` class, and timm's ``ConvMixer`` (``stem``, ``blocks``,
``pooling``, ``head``; another ``Residual`` class). When timm is installed the
tests also run on the real thing.
"""
import torch
from torch import nn


class OfficialResidual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def official_convmixer(dim, depth, kernel_size=9, patch_size=7, n_classes=1000, act=nn.GELU):
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim),
        *[nn.Sequential(
            OfficialResidual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act(),
                                           nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), act(), nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


class Residual(nn.Module):  # timm's wrapper is a different class with the same name and field
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class TimmStyleConvMixer(nn.Module):
    def __init__(self, dim, depth, kernel_size=9, patch_size=7, in_chans=3, num_classes=1000, act_layer=nn.GELU):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), act_layer(),
                                  nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act_layer(),
                                   nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), act_layer(), nn.BatchNorm2d(dim)) for _ in range(depth)])
        self.pooling = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.head_drop(torch.flatten(self.pooling(x), 1)))
