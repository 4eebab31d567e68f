"""Data for ``convmixer-kernels train``: the shipped handwritten digits, and synthetic images.

``load_digits`` reads ``data/digits.npz`` (1797 real 8x8 digits, UCI, CC BY 4.0; see
``data/README.md``), upsamples them bilinearly to ``image_size`` and splits them into a
fixed train/test partition, so training needs no download. ``synthetic`` makes random
images with random labels: only for throughput runs, where accuracy means nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
DIGITS_CLASSES = 10


@dataclass
class Split:
    """Images [N, C, S, S] float32 (normalized) and labels [N] int64, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(DIGITS_PATH):
        raise FileNotFoundError(f"the shipped digits data set is missing at {DIGITS_PATH}; "
                                "reinstall convmixer-kernels (the file is package data)")
    with np.load(DIGITS_PATH, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    if images.shape != (1797, 8, 8) or labels.shape != (1797,):
        raise ValueError(f"{DIGITS_PATH}: unexpected shapes images {images.shape}, labels {labels.shape}")
    return images, labels


def load_digits(image_size: int = 16, *, test_fraction: float = 0.2, seed: int = 0) -> Tuple[Split, Split]:
    """(train, test) splits of the shipped digits, 1 channel, ``image_size`` x ``image_size``.

    Pixels 0..16 are scaled to [0, 1], upsampled bilinearly, then standardized with the
    training split's mean and std. The split is a fixed permutation drawn from ``seed``.
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: the digits are 8x8; use 8 or more")
    images, labels = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return Split(x[train_idx].contiguous(), y[train_idx]), Split(x[test_idx].contiguous(), y[test_idx])


def synthetic(n: int, image_size: int = 32, channels: int = 3, n_classes: int = 10, *,
              seed: int = 0) -> Split:
    """Random normal images with random labels (throughput runs only: nothing to learn)."""
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, channels, image_size, image_size, generator=gen),
                 torch.randint(0, n_classes, (n,), generator=gen))


def batches(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0, device=None,
            channels_last: bool = False, skip: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``split`` in an order fixed by ``seed`` (so a resumed run sees the same order).

    ``skip`` drops the first batches (resuming mid-epoch). A last batch of one image is
    dropped: BatchNorm cannot train on a single value per channel once pooled.
    """
    n = len(split)
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))
    for i, start in enumerate(range(0, n, batch_size)):
        idx = order[start:start + batch_size]
        if i < skip or (shuffle and len(idx) < 2):
            continue
        x, y = split.images[idx], split.labels[idx]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def describe(name: str, train: Split, test: Optional[Split]) -> str:
    c, s = train.images.shape[1], train.images.shape[-1]
    parts = f"{len(train)} train" + (f" / {len(test)} test" if test is not None else "")
    return f"{name}: {parts} images, {c}x{s}x{s}"
