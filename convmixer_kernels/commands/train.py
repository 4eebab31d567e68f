"""``train``: train a ConvMixer on real data: the handwritten digits shipped with the package (no
download, the default), CIFAR-10 python batches or an image folder on disk (``--data PATH``).

The default, ConvMixer-64/4 k5 p2 on the 1797 UCI digits upsampled to 16x16 (1438 train,
359 test; batch 16, one epoch), takes seconds on an idle CPU and reaches about 97% test
accuracy. ``--fused`` (default) runs the fused blocks on ``--backend`` (auto: the best that
runs here; on a CPU that is the torch reference); ``--no-fused`` runs the plain reference
model. ``--synthetic`` trains on random images instead (throughput runs only: there is
nothing to learn). ``--recipe cifar10`` sets the paper's CIFAR-10 configuration (ConvMixer-256/8
k5 p2, AdamW lr 0.01 wd 0.01, one-cycle, batch 512, 25 epochs, random crop with padding 4 and
horizontal flip); options given on the command line still win.

Several processes: ``torchrun --nproc-per-node N -m convmixer_kernels train ...`` (gloo on CPU,
NCCL on GPU) trains with DistributedDataParallel. ``--batch-size`` is the joint batch over all
ranks (each rank takes every N-th image of it, as DistributedSampler deals them), so the steps,
the schedule and the data order do not depend on N, and a checkpoint resumes on any number of
ranks. Rank 0 prints, draws the progress bar and writes checkpoints. Without ``--sync-bn`` each
rank's BatchNorm normalizes with its own share's statistics (as timm does by default); with it
the statistics are those of the joint batch.

Checkpoints (``--save``/``--resume``) are one ``torch.save`` dict laid out like timm's:

    {"state_dict": model.state_dict(),   # the official ConvMixer keys: 0.weight, 3.0.fn.0.weight, ...
     "optimizer": AdamW state_dict, "epoch": completed epochs, "step": optimizer steps done,
     "arch": "convmixer_<dim>_<depth>_k<k>_p<p>", "config": {"model": {...}, "train": {...}},
     "format": "convmixer-kernels/1"}

so ``ConvMixer(...).load_state_dict(torch.load(path)["state_dict"])`` works fused or not, and
``--resume`` also accepts a bare official (or timm, or DDP ``module.``-prefixed) state_dict to start
from. ``--resume`` restores the checkpoint's model and training options (batch size, schedule
length, learning rate, amp, data, augmentation...) except those given on the command line, and
says which.

``--compare`` trains the fused and the reference model from the same seed (same initial
weights, same batches) in lockstep, one step of each in alternating order, and reports whether
the first-step loss, the final training loss and the test accuracy agree within the stated
tolerances, and the speed ratio with its spread over interleaved blocks of steps.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

CHECKPOINT_FORMAT = "convmixer-kernels/1"

# Defaults of the options a checkpoint records. The parser's defaults are None so that an option
# given on the command line can be told from one that was not: the value then comes from (last
# wins) these defaults, the --recipe, the checkpoint being resumed, the command line.
MODEL_DEFAULTS = {"dim": 64, "depth": 4, "kernel_size": 5, "patch_size": 2, "activation": "gelu"}
TRAIN_DEFAULTS = {"epochs": 1, "steps": None, "batch_size": 16, "lr": 0.01, "weight_decay": 0.01, "seed": 0,
                  "amp": False, "channels_last": False, "synthetic": False, "synthetic_samples": 2048,
                  "image_size": None, "data": None, "data_format": "auto", "crop_padding": 0, "flip": False,
                  "mixup": 0.0, "recipe": None}
RECIPES = {
    # "Patches Are All You Need?", CIFAR-10: ConvMixer-256/8 k5 p2, ~92.6% in 25 epochs with the
    # official script (which also uses RandAugment, color jitter and random erasing; not here)
    "cifar10": {"dim": 256, "depth": 8, "kernel_size": 5, "patch_size": 2, "activation": "gelu", "batch_size": 512,
                "epochs": 25, "lr": 0.01, "weight_decay": 0.01, "crop_padding": 4, "flip": True, "image_size": 32},
}


class TrainError(Exception):
    """A problem with the options, the data or a checkpoint: printed as one line, exit status 2."""


def add_arguments(parser) -> None:
    def d(key):
        return (MODEL_DEFAULTS | TRAIN_DEFAULTS)[key]

    g = parser.add_argument_group("model")
    g.add_argument("--dim", type=int, default=None, help=f"default {d('dim')}")
    g.add_argument("--depth", type=int, default=None, help=f"default {d('depth')}")
    g.add_argument("--kernel-size", type=int, default=None, help=f"default {d('kernel_size')}")
    g.add_argument("--patch-size", type=int, default=None, help=f"default {d('patch_size')}")
    g.add_argument("--activation", default=None, choices=["gelu", "gelu_tanh", "relu"], help="default gelu")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="run the fused blocks (default) or the plain reference model (--no-fused)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="backend of the fused blocks (default auto: the best one that runs here)")
    g.add_argument("--memory", default="normal", choices=["normal", "low", "lowest"],
                   help="what a fused training step keeps for the backward: normal (block by block, the fastest), "
                        "low (the layers as one fused stack, two activations per layer), lowest (one)")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a published configuration: cifar10 = ConvMixer-256/8 k5 p2, AdamW, one-cycle, batch 512, "
                        "25 epochs, crop+flip (needs --data with CIFAR-10, or --synthetic)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="train on a data set on disk: a cifar-10-batches-py folder (or its parent), or an image "
                        "folder PATH/<class>/<image> (or PATH/train/..., PATH/val/...; needs Pillow). "
                        "Default: the shipped handwritten digits. Nothing is downloaded")
    g.add_argument("--data-format", default=None, choices=["auto", "cifar10", "imagefolder"],
                   help="the format of --data (default auto: detected)")
    g.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                   help="random images and labels instead of the digits (throughput runs only)")
    g.add_argument("--synthetic-samples", type=int, default=None, help=f"default {d('synthetic_samples')}")
    g.add_argument("--image-size", type=int, default=None,
                   help="default: 16 (digits), 32 (synthetic), the files' size (--data; resized when given)")
    g.add_argument("--crop-padding", type=int, default=None, metavar="N",
                   help="augmentation: random crop after zero padding N pixels per side (default 0: off)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="augmentation: random horizontal flip (default off)")
    g.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                   help="augmentation: mixup with Beta(ALPHA, ALPHA) (default 0: off)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"default {d('epochs')}")
    g.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=None,
                   help="the joint batch over all ranks (default 16: enough steps (90) in one digits epoch for "
                        "BatchNorm's running statistics to settle; raise it for throughput runs)")
    g.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (one-cycle schedule; default 0.01)")
    g.add_argument("--weight-decay", type=float, default=None, help="default 0.01")
    g.add_argument("--seed", type=int, default=None, help="default 0")
    g.add_argument("--device", default=None, help="default: cuda if present, else cpu (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (on CUDA; on a CPU it works but is slow)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the joint batch (nn.SyncBatchNorm; CUDA only "
                        "until the fused SyncBatchNorm lands)")
    g.add_argument("--save", default=None, metavar="PATH",
                   help="write a checkpoint at the end of every epoch (and of the run); '{epoch}' in PATH keeps one "
                        "file per epoch (a run that stops mid-epoch writes PATH with '{epoch}' -> 'step<N>')")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a checkpoint, with its options unless given here (or start from a bare "
                        "official/timm state_dict)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar, only the summary lines")
    g = parser.add_argument_group("compare")
    g.add_argument("--compare", action="store_true",
                   help="train fused and reference in lockstep from the same seed; report agreement and the speed "
                        "ratio with its spread")
    g.add_argument("--loss-tol", type=float, default=0.1,
                   help="agreement of the final training loss (mean of the last 10%% of steps): |fused - reference| "
                        "<= loss-tol * reference + loss-atol (default 0.1)")
    g.add_argument("--loss-atol", type=float, default=0.05, help="see --loss-tol (default 0.05)")
    g.add_argument("--acc-tol", type=float, default=3.0,
                   help="agreement: test accuracy difference in percentage points (default 3)")


# ------------------------------------------------------------------ progress bar


class Progress:
    """A one-line progress bar on stderr: steps, loss, images/s. Plain lines (every 10%) when not a terminal.

    The loss shown is the latest step's; the last line (``final=True``) is always drawn, with the
    value the summary prints.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last_tenth = -1

    def due(self, done: int) -> bool:
        """Whether to redraw now (callers read the loss, a GPU sync, only then). The end is left to
        the final update."""
        if not self.enabled or done >= self.total:
            return False
        if self.tty:
            return time.perf_counter() - self.last_draw >= 0.1
        return (10 * done) // max(self.total, 1) != self.last_tenth

    def update(self, done: int, images: int, loss: Optional[float], final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        self.last_draw, self.last_tenth = now, (10 * done) // max(self.total, 1)
        width = 24
        filled = int(width * done / max(self.total, 1))
        elapsed = now - self.start
        rate = images / elapsed if elapsed > 0 else 0.0
        loss_s = f"{loss:.4f}" if loss is not None else "-"
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"loss {loss_s} | {rate:,.0f} img/s | {elapsed:.1f}s")
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()


# ------------------------------------------------------------------ processes


@dataclass
class Dist:
    """Where this process stands in a torchrun job (world_size 1: a plain single process)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_dist() -> Dist:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise TrainError(f"WORLD_SIZE/RANK/LOCAL_RANK are not integers ({e})") from None


def _init_process_group(dist_info: Dist, device: torch.device) -> None:
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("CONVMIXER_KERNELS_DIST_TIMEOUT", "1800")))
    dist.init_process_group(backend, rank=dist_info.rank, world_size=dist_info.world_size, timeout=timeout)


def _say(dist_info: Dist, *a, **kw) -> None:
    if dist_info.main:
        print(*a, **kw)


def _barrier(dist_info: Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist
        dist.barrier()


# ------------------------------------------------------------------ training


@dataclass
class History:
    losses: List[float] = field(default_factory=list)  # per optimizer step of this run (joint batch)
    images: int = 0
    seconds: float = 0.0  # steady-state training time (after the warm-up steps)
    steady_images: int = 0
    steady_steps: int = 0
    step_seconds: List[float] = field(default_factory=list)  # --compare: each timed step
    test_acc: Optional[float] = None
    test_loss: Optional[float] = None
    backends: List[str] = field(default_factory=list)
    saved: List[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.steady_images / self.seconds if self.seconds > 0 else float("nan")


def _lr_at(step: int, total: int, peak: float) -> float:
    """The official ConvMixer one-cycle schedule: 0 -> peak at 2/5, peak/20 at 4/5, 0 at the end,
    taken at the middle of each step (so neither the first nor a single step has a zero rate)."""
    t = (step + 0.5) / max(total, 1)
    xs, ys = [0.0, 0.4, 0.8, 1.0], [0.0, peak, peak / 20.0, 0.0]
    for i in range(3):
        if t <= xs[i + 1]:
            return ys[i] + (ys[i + 1] - ys[i]) * (t - xs[i]) / (xs[i + 1] - xs[i])
    return 0.0


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unwrap(model):
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def evaluate(model, split, batch_size: int, device, amp: bool, channels_last: bool, dist_info: Dist = Dist()):
    """(accuracy %, mean loss) over ``split``; with several ranks each takes every N-th image and the
    sums are all-reduced (the plain module runs, so no rank waits on another's forward)."""
    from ..datasets import Split, batches

    model = _unwrap(model)
    if dist_info.enabled:
        idx = torch.arange(dist_info.rank, len(split), dist_info.world_size)
        split = Split(split.images[idx], split.labels[idx], split.mean, split.std, split.classes)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, loss
    n = len(split)
    with torch.no_grad(), _autocast(device, amp):
        for x, y in batches(split, max(batch_size // dist_info.world_size, 1), shuffle=False, device=device,
                            channels_last=channels_last):
            out = model(x).float()
            sums[0] += (out.argmax(1) == y).sum()
            sums[1] += F.cross_entropy(out, y, reduction="sum").double()
    total = torch.tensor(float(n), dtype=torch.float64, device=device)
    if dist_info.enabled:
        import torch.distributed as dist
        both = torch.cat([sums, total[None]])
        dist.all_reduce(both)
        sums, total = both[:2], both[2]
    model.train(was_training)
    return 100.0 * float(sums[0]) / float(total), float(sums[1]) / float(total)


def build_model(cfg: dict, fused: bool, backend: str, device, channels_last: bool, memory: str = "normal"):
    from .. import ConvMixer

    model = ConvMixer(cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"], n_classes=cfg["n_classes"],
                      in_chans=cfg["in_chans"], activation=cfg["activation"], fused=fused, backend=backend,
                      memory=memory if fused else "normal")
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def fused_backends_used(model) -> List[str]:
    from ..modules import FusedConvMixerLayer, FusedDepthwiseBlock

    return sorted({m.last_backend for m in _unwrap(model).modules()
                   if isinstance(m, (FusedDepthwiseBlock, FusedConvMixerLayer)) and m.last_backend})


def _stream(train, opts, device, dist_info: Dist, start_step: int, total_steps: int):
    """(step, epoch, x, y, joint batch size) for every step from ``start_step`` to ``total_steps``:
    the same joint batches for any number of ranks, this rank's share of each."""
    from ..datasets import batches, steps_per_epoch

    spe = steps_per_epoch(len(train), opts["batch_size"])
    step = start_step
    while step < total_steps:
        epoch, skip = divmod(step, spe)
        for i, (x, y) in enumerate(batches(train, opts["batch_size"], shuffle=True, seed=opts["seed"] * 1000,
                                           epoch=epoch, device=device, channels_last=opts["channels_last"],
                                           skip=skip, world_size=dist_info.world_size, rank=dist_info.rank,
                                           crop_padding=opts["crop_padding"], flip=opts["flip"])):
            joint = min(opts["batch_size"], len(train) - (skip + i) * opts["batch_size"])
            yield step, epoch, x, y, joint
            step += 1
            if step >= total_steps:
                return


def _loss(model, x, y, joint: int, opts, step: int, device, world_size: int):
    """(loss to backpropagate, this share's summed loss). The loss is scaled so that DDP's gradient
    average is the mean over the joint batch (shares may differ by one image at an epoch's end).
    Mixup draws one lambda per step (from the seed) and mixes within this rank's share."""
    perm, lam = None, 1.0
    if opts["mixup"] > 0:
        rng = np.random.default_rng([opts["seed"], step])
        lam = float(rng.beta(opts["mixup"], opts["mixup"]))
        perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
        x = lam * x + (1.0 - lam) * x[perm]
    with _autocast(device, opts["amp"]):
        out = model(x).float()
    total = F.cross_entropy(out, y, reduction="sum")
    if perm is not None:
        total = lam * total + (1.0 - lam) * F.cross_entropy(out, y[perm], reduction="sum")
    scaled = total * (world_size / joint) if world_size > 1 else total / max(y.shape[0], 1)
    return scaled, total.detach()


def train_run(model, optimizer, train, test, opts, device, *, total_steps: int, start_step: int = 0,
              desc: str = "train", save_fn=None, progress_enabled: bool = True,
              dist_info: Dist = Dist()) -> History:
    """Train from ``start_step`` to ``total_steps``; evaluate (and save) at the end of every epoch."""
    from ..datasets import steps_per_epoch

    spe = steps_per_epoch(len(train), opts["batch_size"])
    hist = History()
    progress = Progress(total_steps - start_step, desc, enabled=progress_enabled and dist_info.main)
    warmup = min(2, max(total_steps - start_step - 1, 0))  # steps left out of images/s (first-use compilation)
    step, images = start_step, 0
    sums, joints, works = [], [], []  # per step: this rank's loss sum (all-reduced into the joint one)
    measuring, t_mark, img_mark, step_mark = warmup == 0, time.perf_counter(), 0, start_step
    model.train()
    for step_i, epoch, x, y, joint in _stream(train, opts, device, dist_info, start_step, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step_i, total_steps, opts["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss, loss_sum = _loss(model, x, y, joint, opts, step_i, device, dist_info.world_size)
        loss.backward()
        optimizer.step()
        step = step_i + 1
        images += joint
        loss_sum = loss_sum.clone()
        if dist_info.enabled:
            import torch.distributed as dist
            works.append(dist.all_reduce(loss_sum, async_op=True))  # every rank, every step: no mismatch
        sums.append(loss_sum)
        joints.append(joint)
        if not measuring and step - start_step >= warmup:
            _sync(device)
            measuring, t_mark, img_mark, step_mark = True, time.perf_counter(), images, step
        if progress.due(step - start_step):
            if works:
                works[-1].wait()
            progress.update(step - start_step, images, float(sums[-1]) / joint)
        if step % spe == 0 or step >= total_steps:  # an epoch ended (or the run): evaluate, save
            _sync(device)
            if measuring:
                hist.seconds += time.perf_counter() - t_mark
                hist.steady_images += images - img_mark
                hist.steady_steps += step - step_mark
            if step >= total_steps:  # the bar's last line before the evaluation, so its rate is training's
                for w in works:
                    w.wait()
                progress.update(step - start_step, images, float(sums[-1]) / joint, final=True)
            if dist_info.enabled:
                _broadcast_buffers(_unwrap(model))  # rank 0's BatchNorm buffers everywhere: eval and save agree
            if test is not None:
                hist.test_acc, hist.test_loss = evaluate(model, test, opts["batch_size"], device, opts["amp"],
                                                         opts["channels_last"], dist_info)
            if save_fn is not None:
                path = save_fn(step, step // spe, step % spe == 0)
                if path:
                    hist.saved.append(path)
            t_mark, img_mark, step_mark = time.perf_counter(), images, step
    for w in works:
        w.wait()
    hist.losses = [float(s) / j for s, j in zip(sums, joints)]
    hist.images = images
    hist.backends = fused_backends_used(model)
    return hist


def _broadcast_buffers(module) -> None:
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b, 0)


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str, model, optimizer, step: int, epoch: int, cfg: dict, train_cfg: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"state_dict": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": step, "arch": f"convmixer_{cfg['dim']}_{cfg['depth']}_k{cfg['kernel_size']}_p{cfg['patch_size']}",
            "config": {"model": cfg, "train": train_cfg}, "format": CHECKPOINT_FORMAT}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict as ``save_checkpoint`` writes it; a bare state_dict comes back as {"state_dict": ...}."""
    from ..checkpoints import to_official_layout

    if not os.path.isfile(path):
        raise TrainError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a file that is not a checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"--resume {path}: not a checkpoint torch.load can read ({first})") from None
    if not isinstance(ckpt, dict):
        raise TrainError(f"--resume {path}: not a checkpoint or state_dict (got {type(ckpt).__name__})")
    if "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt}
    try:
        ckpt["state_dict"] = to_official_layout(ckpt["state_dict"])
    except (ValueError, TypeError) as e:
        raise TrainError(f"--resume {path}: {e}") from None
    return ckpt


# ------------------------------------------------------------------ options


def resolve_options(args, ckpt: Optional[dict]):
    """(model options, training options, notes): defaults < --recipe < checkpoint < command line."""
    given = {k for k in MODEL_DEFAULTS | TRAIN_DEFAULTS if getattr(args, k, None) is not None}
    saved_model = dict((ckpt or {}).get("config", {}).get("model") or {})
    saved_train = dict((ckpt or {}).get("config", {}).get("train") or {})
    layers = [MODEL_DEFAULTS | TRAIN_DEFAULTS, RECIPES[args.recipe] if args.recipe else {},
              {k: v for k, v in (saved_model | saved_train).items() if k in MODEL_DEFAULTS | TRAIN_DEFAULTS}]
    if given & {"synthetic", "data"}:  # the data source is one choice: naming one replaces the saved one
        for k in ("synthetic", "data", "data_format"):
            layers[2].pop(k, None)
    merged: Dict[str, object] = {}
    for layer in layers:
        merged.update(layer)
    notes = []
    restored = {k: v for k, v in layers[2].items() if k not in given and v != (layers[0] | layers[1]).get(k)}
    overridden = {k: (layers[2][k], getattr(args, k)) for k in given if k in layers[2] and layers[2][k] != getattr(args, k)}
    for k in given:
        merged[k] = getattr(args, k)
    model_clash = {k: v for k, v in overridden.items() if k in MODEL_DEFAULTS and k in saved_model}
    if model_clash:
        k, (old, new) = next(iter(model_clash.items()))
        raise TrainError(f"--{k.replace('_', '-')} {new} does not fit the checkpoint {args.resume} ({k} {old}): "
                         "drop the option to resume it, or start a new run")
    if restored:
        notes.append("options restored from the checkpoint (give them on the command line to override): "
                     + ", ".join(f"{k}={v}" for k, v in sorted(restored.items())))
    if overridden:
        notes.append("command line overrides the checkpoint: "
                     + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(overridden.items())))
    model = {k: merged[k] for k in MODEL_DEFAULTS}
    train = {k: merged[k] for k in TRAIN_DEFAULTS}
    return model, train, notes


def _check_options(args, m: dict, t: dict, dist_info: Dist) -> None:
    for name in ("dim", "depth", "kernel_size", "patch_size"):
        if m[name] < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1 (got {m[name]})")
    if t["epochs"] < 1:
        raise TrainError(f"--epochs must be at least 1 (got {t['epochs']})")
    if t["steps"] is not None and t["steps"] < 1:
        raise TrainError(f"--steps must be at least 1 (got {t['steps']})")
    if t["batch_size"] < 2:
        raise TrainError("--batch-size must be at least 2 (BatchNorm trains on batch statistics)")
    if t["synthetic"] and t["synthetic_samples"] < 2:
        raise TrainError("--synthetic-samples must be at least 2")
    if t["synthetic"] and t["data"]:
        raise TrainError("--synthetic and --data exclude each other")
    if not (t["lr"] >= 0 and math.isfinite(t["lr"])):
        raise TrainError(f"--lr must be a finite number >= 0 (got {t['lr']})")
    if not (t["weight_decay"] >= 0 and math.isfinite(t["weight_decay"])):
        raise TrainError(f"--weight-decay must be a finite number >= 0 (got {t['weight_decay']})")
    if t["image_size"] is not None and t["image_size"] < 1:
        raise TrainError(f"--image-size must be at least 1 (got {t['image_size']})")
    if t["crop_padding"] < 0:
        raise TrainError(f"--crop-padding must be >= 0 (got {t['crop_padding']})")
    if not (t["mixup"] >= 0 and math.isfinite(t["mixup"])):
        raise TrainError(f"--mixup must be >= 0 (got {t['mixup']})")
    if args.recipe == "cifar10" and not (t["data"] or t["synthetic"]):
        raise TrainError("--recipe cifar10 trains on CIFAR-10: give --data PATH (the cifar-10-batches-py folder; "
                         "nothing is downloaded), or --synthetic for a throughput run")
    if args.compare and (args.resume or args.save):
        raise TrainError("--compare trains two fresh models: it takes no --resume or --save")
    if args.compare and dist_info.enabled:
        raise TrainError("--compare runs in one process: start it without torchrun")
    if dist_info.enabled and t["batch_size"] % dist_info.world_size:
        raise TrainError(f"--batch-size {t['batch_size']} (the joint batch) does not split evenly over "
                         f"{dist_info.world_size} ranks")
    if args.save:
        try:
            args.save.format(epoch=1)
        except (KeyError, IndexError, ValueError) as e:
            raise TrainError(f"--save {args.save}: only '{{epoch}}' may appear in braces ({type(e).__name__}: {e})") \
                from None


def _device(args, dist_info: Dist) -> torch.device:
    try:
        if args.device:
            device = torch.device(args.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", dist_info.local_rank if dist_info.enabled else 0)
        else:
            device = torch.device("cpu")
    except RuntimeError as e:
        raise TrainError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {args.device}: only cpu and cuda are supported")
    return device


def _data(t: dict):
    from ..datasets import (DIGITS_CLASSES, DataError, describe, detect_format, load_cifar10, load_digits,
                            load_image_folder, synthetic)

    try:
        if t["synthetic"]:
            size = t["image_size"] or 32
            train = synthetic(t["synthetic_samples"], size, 3, DIGITS_CLASSES, seed=t["seed"])
            return train, None, describe("synthetic (random images and labels)", train, None), DIGITS_CLASSES
        if t["data"]:
            fmt = t["data_format"] if t["data_format"] != "auto" else detect_format(t["data"])
            if fmt == "cifar10":
                train, test = load_cifar10(t["data"], t["image_size"])
                return train, test, describe(f"CIFAR-10 ({t['data']})", train, test), 10
            train, test = load_image_folder(t["data"], t["image_size"])
            return train, test, describe(f"image folder {t['data']} ({train.n_classes} classes)", train, test), \
                train.n_classes
        train, test = load_digits(t["image_size"] or 16)
        return train, test, describe("handwritten digits (UCI, shipped)", train, test), DIGITS_CLASSES
    except (DataError, ValueError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None


def _summary(h: History) -> str:
    parts = [f"final loss {h.losses[-1]:.4f}" if h.losses else "no steps run"]
    if h.test_acc is not None:
        parts.append(f"test accuracy {h.test_acc:.1f}% (loss {h.test_loss:.4f})")
    parts.append(f"{h.images_per_s:,.0f} img/s")
    return ", ".join(parts)


def _sync_bn(model, dist_info: Dist, device: torch.device):
    """--sync-bn: nn.SyncBatchNorm over the process group (the package's own fused SyncBN when it exists)."""
    import convmixer_kernels

    if not dist_info.enabled:
        _say(dist_info, "note: --sync-bn with one process: there is nothing to synchronize; BatchNorm left as is")
        return model
    own = getattr(convmixer_kernels, "convert_sync_batchnorm", None)  # the fused SyncBN (CPU and GPU), once it lands
    if own is not None:
        return own(model)
    if device.type != "cuda":
        raise TrainError("--sync-bn on CPU: PyTorch's nn.SyncBatchNorm refuses CPU tensors and this version has no "
                         "fused SyncBatchNorm yet; train on CUDA devices, or without --sync-bn")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ------------------------------------------------------------------ the command


def run(args) -> int:
    from ..backends import BackendUnavailableError

    dist_info = Dist()
    try:
        dist_info = _env_dist()
        return _run(args, dist_info)
    except (TrainError, BackendUnavailableError) as e:
        print(f"train: {e}" if dist_info.main else f"train [rank {dist_info.rank}]: {e}", file=sys.stderr)
        return 2
    finally:
        if dist_info.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _run(args, dist_info: Dist) -> int:
    from ..datasets import steps_per_epoch

    ckpt = load_checkpoint(args.resume) if args.resume else None
    m, t, notes = resolve_options(args, ckpt)
    _check_options(args, m, t, dist_info)
    device = _device(args, dist_info)
    if dist_info.enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _init_process_group(dist_info, device)
    train, test, data_desc, n_classes = _data(t)
    cfg = dict(m, n_classes=n_classes, in_chans=int(train.images.shape[1]))
    if min(train.images.shape[-2:]) < cfg["patch_size"]:
        raise TrainError(f"--patch-size {cfg['patch_size']} is larger than the {train.images.shape[-1]}-pixel images: "
                         "lower --patch-size or raise --image-size")
    for note in notes:
        _say(dist_info, f"train: {note}")
    spe = steps_per_epoch(len(train), t["batch_size"])
    total = t["steps"] if t["steps"] is not None else t["epochs"] * spe
    prec = "bf16 autocast" if t["amp"] else "fp32"
    procs = f" x {dist_info.world_size} ranks ({t['batch_size'] // dist_info.world_size} each)" if dist_info.enabled else ""
    aug = [f"crop (padding {t['crop_padding']})"] if t["crop_padding"] else []
    aug += ["flip"] if t["flip"] else []
    aug += [f"mixup {t['mixup']}"] if t["mixup"] else []
    _say(dist_info, f"data: {data_desc}; ConvMixer-{cfg['dim']}/{cfg['depth']} k{cfg['kernel_size']} "
         f"p{cfg['patch_size']} {cfg['activation']}; {total} steps of batch {t['batch_size']}{procs} ({spe} per epoch), "
         f"{prec}{', augment: ' + ' + '.join(aug) if aug else ''}, on {device}", flush=True)
    if args.compare:
        return _compare(args, cfg, t, train, test, device, total)

    torch.manual_seed(t["seed"])
    model = build_model(cfg, args.fused, args.backend, device, t["channels_last"], args.memory)
    start = 0
    opt_state = None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:  # another model size: say which options would match
            first = str(e).splitlines()[0]
            raise TrainError(f"{args.resume} does not fit ConvMixer-{cfg['dim']}/{cfg['depth']} k{cfg['kernel_size']} "
                             f"p{cfg['patch_size']} with {cfg['in_chans']} input channels and {cfg['n_classes']} "
                             f"classes (set --dim/--depth/--kernel-size/--patch-size to the checkpoint's): {first}") \
                from None
        if "optimizer" in ckpt:
            opt_state = ckpt["optimizer"]
            start = int(ckpt.get("step", 0))
        _say(dist_info, f"resumed from {args.resume} at step {start}")
        if start >= total:
            _say(dist_info, f"train: the checkpoint is at step {start}, the run asks for {total}: nothing to do "
                 "(raise --epochs or --steps)")
            return 0
    if args.sync_bn:
        model = _sync_bn(model, dist_info, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_cfg = dict(t, total_steps=total, world_size=dist_info.world_size)
    save_fn = None
    if args.save:
        def save_fn(step, epoch, epoch_end):
            # a run that stops mid-epoch must not overwrite that epoch's file
            path = args.save.format(epoch=epoch if epoch_end else f"step{step}")
            if dist_info.main:
                save_checkpoint(path, model, optimizer, step, epoch, cfg, train_cfg)
            _barrier(dist_info)
            return path
    label = f"{'fused' if args.fused else 'reference'}"
    hist = train_run(model, optimizer, train, test, t, device, total_steps=total, start_step=start, desc=label,
                     save_fn=save_fn, progress_enabled=not args.no_progress, dist_info=dist_info)
    ran = f" (fused blocks ran on: {', '.join(hist.backends)})" if args.fused else ""
    _say(dist_info, f"{label}{ran}: {_summary(hist)}", flush=True)
    if t["synthetic"]:
        _say(dist_info, "synthetic data: random labels, so the loss and accuracy mean nothing; the images/s do")
    if hist.saved:
        shown = hist.saved if len(hist.saved) <= 3 else [hist.saved[0], "...", hist.saved[-1]]
        _say(dist_info, f"checkpoint{'s' if len(hist.saved) > 1 else ''}: {', '.join(shown)} (state_dict in the "
             "official layout; optimizer, epoch, step alongside)")
    return 0


# ------------------------------------------------------------------ --compare


def _ratio_spread(f_times: List[float], r_times: List[float], blocks: int = 5):
    """Per block of consecutive interleaved steps: reference time / fused time. (median, lo, hi, n)."""
    n = min(len(f_times), len(r_times))
    blocks = min(blocks, n // 2)
    if blocks < 2:
        return None
    size = n // blocks
    ratios = [sum(r_times[i * size:(i + 1) * size]) / sum(f_times[i * size:(i + 1) * size]) for i in range(blocks)]
    return statistics.median(ratios), min(ratios), max(ratios), blocks, size


def _compare(args, cfg, t, train, test, device, total: int) -> int:
    models, opts, hists = {}, {}, {}
    for fused in (True, False):
        torch.manual_seed(t["seed"])  # the same initial weights: ConvMixer(fused=True) draws exactly as the reference
        models[fused] = build_model(cfg, fused, args.backend, device, t["channels_last"], args.memory)
        opts[fused] = torch.optim.AdamW(models[fused].parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
        hists[fused] = History()
        models[fused].train()
    progress = Progress(total, "compare", enabled=not args.no_progress)
    warmup = min(2, max(total - 1, 0))
    for step, epoch, x, y, joint in _stream(train, t, device, Dist(), 0, total):
        order = (True, False) if step % 2 == 0 else (False, True)  # alternate: neither always runs second
        for fused in order:
            model, opt, h = models[fused], opts[fused], hists[fused]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, t["lr"])
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, loss_sum = _loss(model, x, y, joint, t, step, device, 1)
            loss.backward()
            opt.step()
            _sync(device)
            if step >= warmup:
                h.step_seconds.append(time.perf_counter() - t0)
                h.steady_images += joint
                h.steady_steps += 1
            h.losses.append(float(loss_sum) / joint)
            h.images += joint
        if progress.due(step + 1):
            progress.update(step + 1, 2 * hists[True].images, hists[True].losses[-1])
    progress.update(total, 2 * hists[True].images, hists[True].losses[-1] if hists[True].losses else None, final=True)
    for fused in (True, False):
        h = hists[fused]
        h.seconds = sum(h.step_seconds)
        h.backends = fused_backends_used(models[fused])
        if test is not None:
            h.test_acc, h.test_loss = evaluate(models[fused], test, t["batch_size"], device, t["amp"],
                                               t["channels_last"])
    f, r = hists[True], hists[False]
    first_tol = 2e-2 if t["amp"] else 1e-3
    n_last = max(1, math.ceil(len(r.losses) / 10))
    last_f, last_r = sum(f.losses[-n_last:]) / n_last, sum(r.losses[-n_last:]) / n_last
    # (what, |difference|, allowed, unit): the first step starts from identical weights and data, so
    # only rounding separates them; later steps may drift apart as any two float orders of work do
    checks = [("first-step loss", abs(f.losses[0] - r.losses[0]), first_tol * abs(r.losses[0]), ""),
              (f"final training loss (mean of last {n_last} steps)", abs(last_f - last_r),
               args.loss_tol * abs(last_r) + args.loss_atol, "")]
    if f.test_acc is not None:
        checks.append(("test accuracy", abs(f.test_acc - r.test_acc), args.acc_tol, " points"))
    print(f"\nfused (blocks ran on: {', '.join(f.backends) or 'none'}): {_summary(f)}")
    print(f"reference: {_summary(r)}")
    agree = True
    for name, diff, tol, unit in checks:
        ok = diff <= tol
        agree &= ok
        print(f"  {'ok' if ok else 'XX'} {name}: difference {diff:.3g}{unit}, allowed {tol:.3g}{unit}")
    print(f"{'AGREE' if agree else 'DISAGREE'}: fused and reference training "
          f"{'agree' if agree else 'do not agree'} within the tolerances")
    spread = _ratio_spread(f.step_seconds, r.step_seconds)
    if spread is None:
        print(f"speed: only {len(f.step_seconds)} steps were timed after the warm-up; too few to measure a ratio "
              "(raise --steps)")
    else:
        med, lo, hi, blocks, size = spread
        span = f"reference/fused step time {med:.2f}x (median; range {lo:.2f}-{hi:.2f}x over {blocks} interleaved " \
               f"blocks of {size} steps)"
        if lo <= 1.0 <= hi:
            print(f"speed: no difference measurable: {span}")
        else:
            print(f"speed: fused is {'faster' if med > 1 else 'slower'}: {span}")
    if f.backends == ["torch"]:
        print("note: the fused blocks ran on the torch backend (the reference composition; what 'auto' picks on "
              "a CPU), so expect identical results and a ratio near 1x")
    return 0 if agree else 1
