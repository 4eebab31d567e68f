"""Data for ``convmixer-kernels train``: the shipped handwritten digits, real data sets on disk,
and synthetic images.

``load_digits`` reads ``data/digits.npz`` (1797 real 8x8 digits, UCI, CC BY 4.0; see
``data/README.md``), upsamples them bilinearly to ``image_size`` and splits them into a
fixed train/test partition, so training needs no download. ``load_cifar10`` reads the
CIFAR-10 python batches (``cifar-10-batches-py``) and ``load_image_folder`` an
ImageFolder-style directory (``root/<class>/<image>``, optionally under ``train/`` and
``val/``); both read local files only (nothing is downloaded) and keep the images in memory
as uint8, normalized per batch. ``synthetic`` makes random images with random labels: only
for throughput runs, where accuracy means nothing.

Augmentations (``augment``): random crop with zero padding and horizontal flip, applied per
batch with a generator seeded from (seed, epoch, step) so a resumed run sees the same images.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
DIGITS_CLASSES = 10


@dataclass
class Split:
    """Images [N, C, S, S] and labels [N] int64, on the CPU.

    Images are either float32, already normalized (digits, synthetic), or uint8 pixels with a
    per-channel ``mean``/``std`` (of pixel/255) that ``batches`` applies after augmentation.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    classes: Optional[List[str]] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes is not None else int(self.labels.max()) + 1


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


# ------------------------------------------------------------------ real data sets on disk

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data set on disk is missing, incomplete or malformed; the message names the file."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays, lists, bytes) and nothing else: a pickle
    can run arbitrary code, so every other global is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays")


def _cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (a cifar-10-batches-py folder has data_batch_1..5 and test_batch)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict)")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: not a CIFAR-10 python batch (keys {sorted(d)}; expected data and labels)")
    data, labels = np.asarray(d["data"]), np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: data {data.dtype}{list(data.shape)} with {len(labels)} labels; expected uint8 "
                        "[N, 3072] (3x32x32 per row) and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def find_cifar10(path: str) -> Optional[str]:
    """The ``cifar-10-batches-py`` folder at or directly under ``path``, or None."""
    for d in (path, os.path.join(path, CIFAR10_DIR)):
        if os.path.isfile(os.path.join(d, "data_batch_1")) or os.path.isfile(os.path.join(d, "test_batch")):
            return d
    return None


def _channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)  # a constant channel would divide by zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_cifar10(path: str, image_size: Optional[int] = None) -> Tuple[Split, Split]:
    """(train, test) from the CIFAR-10 python batches in ``path`` (the ``cifar-10-batches-py``
    folder, or the folder that holds it). Nothing is downloaded. Normalized with the training
    images' per-channel mean and std; ``image_size`` other than 32 resizes (bilinear)."""
    root = find_cifar10(path)
    if root is None:
        raise DataError(f"{path}: no CIFAR-10 python batches here or in {os.path.join(path, CIFAR10_DIR)} "
                        "(data_batch_1..5, test_batch; nothing is downloaded)")
    parts = [_cifar_batch(os.path.join(root, name)) for name in CIFAR10_TRAIN]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    test_x, test_y = (torch.from_numpy(a) for a in _cifar_batch(os.path.join(root, "test_batch")))
    classes = [f"class_{i}" for i in range(10)]
    meta = os.path.join(root, "batches.meta")
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                names = _ArraysOnly(f, encoding="bytes").load().get(b"label_names")
            if names and len(names) == 10:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except Exception:  # the names are only labels for messages; the batches are what count
            pass
    for name, y in (("training", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"{root}: {name} labels outside 0..9")
    if image_size is not None:
        train_x, test_x = _resize_uint8(train_x, image_size), _resize_uint8(test_x, image_size)
    mean, std = _channel_stats(train_x)
    return (Split(train_x.contiguous(), train_y, mean, std, classes),
            Split(test_x.contiguous(), test_y, mean, std, classes))


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow, which is not installed: "
                        "pip install 'convmixer-kernels[data]' (or pip install Pillow)") from None
    return Image


def _class_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _read_folder(root: str, classes: Sequence[str], image_size: Optional[int], mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    Image = _pil()
    images, labels, first = [], [], None
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):
            continue  # a class with no images in this split
        for dirpath, dirnames, filenames in sorted(os.walk(d)):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    with Image.open(path) as im:
                        im = im.convert(mode)
                        if image_size is not None and im.size != (image_size, image_size):
                            im = im.resize((image_size, image_size), Image.BILINEAR)
                        arr = np.asarray(im, dtype=np.uint8)
                except (OSError, ValueError) as e:
                    raise DataError(f"{path}: cannot read the image ({e})") from None
                if first is None:
                    first = (path, arr.shape)
                elif arr.shape != first[1]:
                    raise DataError(f"{path} is {arr.shape[1]}x{arr.shape[0]} but {first[0]} is "
                                    f"{first[1][1]}x{first[1][0]}: give --image-size to resize them all")
                images.append(arr)
                labels.append(label)
    if not images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under its class folders")
    x = torch.from_numpy(np.stack(images))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor(labels, dtype=torch.int64)


def load_image_folder(path: str, image_size: Optional[int] = None, *, channels: int = 3) -> Tuple[Split, Optional[Split]]:
    """(train, test) from an ImageFolder-style directory, read with Pillow (no torchvision):

        path/<class>/<image>                      -> train only (test is None)
        path/train/<class>/..., path/val/<class>/...   (or test/) -> both

    Classes are the sorted folder names (label i = the i-th). Images are converted to RGB
    (``channels=3``) or grayscale (1); all must have one size unless ``image_size`` resizes them.
    The whole set is read into memory (uint8), so this is for data sets that fit in RAM.
    """
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a directory")
    mode = {3: "RGB", 1: "L"}[channels]
    train_root = os.path.join(path, "train")
    test_root = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    if not os.path.isdir(train_root):
        train_root, test_root = path, None
    classes = _class_dirs(train_root)
    if not classes:
        raise DataError(f"{train_root}: no class folders (expected {train_root}/<class>/<image>)")
    if test_root is not None:
        extra = sorted(set(_class_dirs(test_root)) - set(classes))
        if extra:
            raise DataError(f"{test_root}: classes {extra} are not in {train_root}")
    train_x, train_y = _read_folder(train_root, classes, image_size, mode)
    mean, std = _channel_stats(train_x)
    train = Split(train_x, train_y, mean, std, list(classes))
    test = None
    if test_root is not None:
        test_x, test_y = _read_folder(test_root, classes, image_size, mode)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(f"{test_root}: images are {tuple(test_x.shape[2:])}, the training images "
                            f"{tuple(train_x.shape[2:])}: give --image-size")
        test = Split(test_x, test_y, mean, std, list(classes))
    return train, test


def detect_format(path: str) -> str:
    """"cifar10" or "imagefolder" for the data set at ``path`` (DataError if neither)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if find_cifar10(path) is not None:
        return "cifar10"
    if os.path.isdir(path) and _class_dirs(path):
        return "imagefolder"
    raise DataError(f"{path}: neither CIFAR-10 python batches (data_batch_1..5, test_batch) nor an image folder "
                    "(<class>/<image> or train/<class>/<image>)")


def synthetic(n: int, image_size: int = 32, channels: int = 3, n_classes: int = 10, *,
              seed: int = 0) -> Split:
    """Random normal images with random labels (throughput runs only: nothing to learn)."""
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, channels, image_size, image_size, generator=gen),
                 torch.randint(0, n_classes, (n,), generator=gen))


def _normalize(split: Split, x: torch.Tensor) -> torch.Tensor:
    if split.images.dtype != torch.uint8:
        return x
    mean = torch.tensor(split.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(split.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, *, crop_padding: int = 0, flip: bool = False,
            rows: slice = slice(None), joint: Optional[int] = None) -> torch.Tensor:
    """Random crop (zero padding ``crop_padding`` on each side, then a crop of the original size at a
    random offset per image) and random horizontal flip (p = 1/2 per image).

    The draws come from ``generator`` (on the CPU), for a joint batch of ``joint`` images (default:
    ``x``'s), of which ``x`` holds the ``rows``: so every rank draws the same joint augmentation and
    applies its own images' share, and the result does not depend on the device or the rank count.
    """
    n, c, h, w = x.shape
    joint = n if joint is None else joint
    p = crop_padding
    oy = torch.randint(0, 2 * p + 1, (joint,), generator=generator)[rows] if p > 0 else None
    ox = torch.randint(0, 2 * p + 1, (joint,), generator=generator)[rows] if p > 0 else None
    fl = (torch.rand(joint, generator=generator) < 0.5)[rows] if flip else None
    if n == 0:
        return x
    dev = x.device
    if p > 0:
        xp = F.pad(x, (p, p, p, p))
        r = (oy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        q = (ox.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], r, q]
    if flip:
        x = torch.where(fl.to(dev).view(n, 1, 1, 1), x.flip(-1), x)
    return x


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch; the same permutation ``torch.utils.data.DistributedSampler``
    draws with ``seed`` and ``set_epoch(epoch)`` (so one process and N ranks see the same joint batches)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def rank_indices(n: int, seed: int, epoch: int, world_size: int, rank: int) -> List[int]:
    """This rank's samples of one epoch, from ``DistributedSampler`` (the tail padding it adds to make
    the count divisible by the world size is dropped, so no image counts twice)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    # position of the k-th index of this rank in the padded global order is rank + k * world_size
    return [i for k, i in enumerate(sampler) if rank + k * world_size < n]


def batches(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0, device=None,
            channels_last: bool = False, skip: int = 0, epoch: int = 0, world_size: int = 1, rank: int = 0,
            crop_padding: int = 0, flip: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``split`` in an order fixed by ``seed + epoch`` (so a resumed run sees the same order).

    ``batch_size`` is the joint batch over all ranks: with ``world_size`` > 1 this rank gets its
    share (every ``world_size``-th image of the joint batch, as ``DistributedSampler`` deals them),
    so N ranks together see exactly the batches one process sees. ``skip`` drops the first batches
    (resuming mid-epoch). A last joint batch of one image is dropped: BatchNorm cannot train on a
    single value per channel once pooled. Augmentation (training only) is drawn per joint batch
    and sliced, so it is the same for any number of ranks.
    """
    n = len(split)
    if world_size > 1:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} ranks")
        mine = torch.tensor(rank_indices(n, seed, epoch, world_size, rank), dtype=torch.long)
    order = epoch_order(n, seed, epoch, shuffle)
    per_rank = batch_size // world_size
    for i, start in enumerate(range(0, n, batch_size)):
        full = min(batch_size, n - start)
        if i < skip or (shuffle and full < 2):
            continue
        if world_size > 1:
            idx = mine[i * per_rank:(i + 1) * per_rank]
        else:
            idx = order[start:start + batch_size]
        x, y = split.images[idx], split.labels[idx]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if shuffle and (crop_padding or flip):
            gen = torch.Generator().manual_seed(((seed * 1000003 + epoch) * 1000003 + i) % (2 ** 63))
            x = augment(x if x.dtype != torch.uint8 else x.float(), gen, crop_padding=crop_padding, flip=flip,
                        rows=slice(rank, None, world_size), joint=full)
        x = _normalize(split, x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def describe(name: str, train: Split, test: Optional[Split]) -> str:
    c, h, w = train.images.shape[1:]
    parts = f"{len(train)} train" + (f" / {len(test)} test" if test is not None else "")
    return f"{name}: {parts} images, {c}x{h}x{w}"
