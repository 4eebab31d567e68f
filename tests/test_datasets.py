"""Real data sets on disk (issue 13): CIFAR-10 python batches and ImageFolder directories, generated
small here (nothing is downloaded), the augmentations, the joint-batch split over ranks, and
``train --data`` / ``--recipe cifar10`` end to end."""
import os
import pickle

import numpy as np
import pytest
import torch

from convmixer_kernels import datasets
from convmixer_kernels.cli import main
from convmixer_kernels.datasets import (DataError, augment, batches, detect_format, load_cifar10, load_image_folder,
                                        rank_indices, steps_per_epoch)

TINY = ["--dim", "16", "--depth", "1", "--kernel-size", "3", "--no-progress", "--device", "cpu"]


def _write_cifar(root, n_per_batch=6, seed=0):
    """A cifar-10-batches-py folder with the real layout: 5 training batches, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    batches_written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}, f)
        batches_written[name] = (data, labels)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"name{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return d, batches_written


def test_cifar10_batches_load_as_written(tmp_path):
    d, written = _write_cifar(tmp_path)
    for path in (str(tmp_path), d):  # the folder or its parent
        train, test = load_cifar10(path)
        assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
        assert test.images.shape == (6, 3, 32, 32) and train.classes[3] == "name3"
    data, labels = written["data_batch_2"]
    # row layout: 1024 red, then green, then blue, each row-major 32x32
    assert torch.equal(train.images[6], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert train.labels[6:12].tolist() == labels
    assert detect_format(str(tmp_path)) == "cifar10"
    x, _ = next(batches(train, 30, shuffle=False))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1e-4  # normalized with the training statistics


def test_cifar10_refuses_code_in_the_pickle(tmp_path):
    d, _ = _write_cifar(tmp_path)
    with open(os.path.join(d, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": os.system, b"labels": []}, f)  # a global that is not a numpy array
    with pytest.raises(DataError, match="data_batch_3.*refusing"):
        load_cifar10(d)
    os.remove(os.path.join(d, "data_batch_3"))
    with pytest.raises(DataError, match="data_batch_3: missing"):
        load_cifar10(d)


def _write_image_folder(root, split_dirs=("train", "val"), size=10, per_class=4, classes=("cat", "dog", "eel")):
    Image = pytest.importorskip("PIL.Image", reason="image folders are read with Pillow (the [data] extra)")
    rng = np.random.default_rng(1)
    for split in split_dirs:
        for c in classes:
            d = os.path.join(root, split, c) if split else os.path.join(root, c)
            os.makedirs(d)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                ext = ".png" if i % 2 == 0 else ".jpg"
                Image.fromarray(arr).save(os.path.join(d, f"img{i}{ext}"))
    return root


def test_image_folder_train_val(tmp_path):
    root = _write_image_folder(str(tmp_path))
    train, test = load_image_folder(root)
    assert train.classes == ["cat", "dog", "eel"] and train.images.shape == (12, 3, 10, 10)
    assert test is not None and len(test) == 12 and train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    from PIL import Image
    png = np.array(Image.open(os.path.join(root, "train", "dog", "img0.png")).convert("RGB"))
    assert torch.equal(train.images[4], torch.from_numpy(png).permute(2, 0, 1))  # png is lossless
    assert detect_format(root) == "imagefolder"
    resized, _ = load_image_folder(root, image_size=6)
    assert resized.images.shape == (12, 3, 6, 6)


def test_image_folder_flat_and_errors(tmp_path):
    root = _write_image_folder(str(tmp_path / "flat"), split_dirs=("",))
    train, test = load_image_folder(root)
    assert len(train) == 12 and test is None
    from PIL import Image
    Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(os.path.join(root, "cat", "odd.png"))
    with pytest.raises(DataError, match="odd.png is 5x7.*--image-size"):
        load_image_folder(root)
    with open(os.path.join(root, "dog", "broken.png"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DataError, match="broken.png: cannot read"):
        load_image_folder(root, image_size=8)


def test_image_folder_without_pillow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    os.makedirs(tmp_path / "a")
    real_import = builtins.__import__

    def no_pil(name, *a, **kw):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(DataError, match=r"Pillow.*convmixer-kernels\[data\]"):
        load_image_folder(str(tmp_path))


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    y = augment(x, g, crop_padding=0, flip=True)
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    y = augment(x, torch.Generator().manual_seed(3), crop_padding=2)
    assert y.shape == x.shape
    for i in range(2):  # a shifted window of the zero-padded image: every nonzero value is from x, in order
        vals = y[i][y[i] != 0]
        assert set(vals.tolist()) <= set(x[i].flatten().tolist())
    # the same generator seed, the same augmentation; a slice of a joint batch gets the joint draws
    a = augment(x, torch.Generator().manual_seed(5), crop_padding=1, flip=True)
    b = augment(x[1:], torch.Generator().manual_seed(5), crop_padding=1, flip=True, rows=slice(1, None, 1), joint=2)
    assert torch.equal(a[1:], b)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shares_make_the_single_process_batches(world):
    """N ranks' batches (DistributedSampler's deal) put together are exactly one process's batches,
    augmentation included, for every step of an epoch (the tail batch too)."""
    n, bs = 50, 8  # 6 full batches and a tail of 2
    split = datasets.Split(torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8), torch.arange(n),
                           (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    kw = dict(shuffle=True, seed=7000, epoch=3, crop_padding=2, flip=True)
    single = list(batches(split, bs, **kw))
    ranks = [list(batches(split, bs, world_size=world, rank=r, **kw)) for r in range(world)]
    assert len(single) == steps_per_epoch(n, bs) and all(len(r) == len(single) for r in ranks)
    for step, (x, y) in enumerate(single):
        for r in range(world):
            xr, yr = ranks[r][step]
            assert torch.equal(yr, y[r::world]) and torch.equal(xr, x[r::world])
    assert sorted(i for r in range(world) for i in rank_indices(n, 7000, 3, world, r)) == list(range(n))


def test_train_on_generated_cifar10_with_recipe_overrides(tmp_path, capsys):
    _write_cifar(tmp_path, n_per_batch=8)
    # the recipe's model, shrunk on the command line (options given win over the recipe)
    assert main(["train", "--recipe", "cifar10", "--data", str(tmp_path), "--steps", "2", "--batch-size", "16",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "CIFAR-10" in out and "40 train / 8 test images, 3x32x32" in out
    assert "ConvMixer-16/1 k3 p2" in out and "crop (padding 4) + flip" in out and "test accuracy" in out


def test_recipe_sets_the_papers_cifar10_configuration(tmp_path):
    import argparse

    from convmixer_kernels.commands import train as train_cmd

    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    m, t, _ = train_cmd.resolve_options(p.parse_args(["--recipe", "cifar10", "--data", "x"]), None)
    assert (m["dim"], m["depth"], m["kernel_size"], m["patch_size"]) == (256, 8, 5, 2)
    assert (t["batch_size"], t["epochs"], t["lr"], t["weight_decay"], t["crop_padding"], t["flip"]) == \
        (512, 25, 0.01, 0.01, 4, True)
    m, t, _ = train_cmd.resolve_options(p.parse_args([]), None)
    assert (m["dim"], t["batch_size"], t["crop_padding"], t["flip"], t["mixup"]) == (64, 16, 0, False, 0.0)


def test_train_on_generated_image_folder_with_mixup(tmp_path, capsys):
    root = _write_image_folder(str(tmp_path))
    assert main(["train", "--data", root, "--steps", "2", "--batch-size", "4", "--mixup", "0.4", "--flip",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "image folder" in out and "(3 classes)" in out and "12 train / 12 test images, 3x10x10" in out
    assert "mixup 0.4" in out and "final loss" in out
