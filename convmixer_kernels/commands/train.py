"""``train``: train a ConvMixer on real handwritten digits shipped with the package (no download).

The default, ConvMixer-64/4 k5 p2 on the 1797 UCI digits upsampled to 16x16 (1438 train,
359 test; batch 16, one epoch), takes seconds on an idle CPU and reaches about 97% test
accuracy. ``--fused`` (default) runs the fused blocks on ``--backend`` (auto: the best that
runs here; on a CPU that is the torch reference); ``--no-fused`` runs the plain reference
model. ``--synthetic`` trains on random images instead (throughput runs only: there is
nothing to learn).

Checkpoints (``--save``/``--resume``) are one ``torch.save`` dict laid out like timm's:

    {"state_dict": model.state_dict(),   # the official ConvMixer keys: 0.weight, 3.0.fn.0.weight, ...
     "optimizer": AdamW state_dict, "epoch": completed epochs, "step": optimizer steps done,
     "arch": "convmixer_<dim>_<depth>_k<k>_p<p>", "config": {"model": {...}, "train": {...}},
     "format": "convmixer-kernels/1"}

so ``ConvMixer(...).load_state_dict(torch.load(path)["state_dict"])`` works fused or not, and
``--resume`` also accepts a bare official (or timm) state_dict to start from.

``--compare`` trains the fused and the reference model from the same seed (same initial
weights, same batches) and reports whether the first-step loss, the final training loss
and the test accuracy agree within the stated tolerances, and the speedup.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

CHECKPOINT_FORMAT = "convmixer-kernels/1"


def add_arguments(parser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--kernel-size", type=int, default=5)
    g.add_argument("--patch-size", type=int, default=2)
    g.add_argument("--activation", default="gelu", choices=["gelu", "gelu_tanh", "relu"])
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="run the fused blocks (default) or the plain reference model (--no-fused)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="backend of the fused blocks (default auto: the best one that runs here)")
    g = parser.add_argument_group("data")
    g.add_argument("--synthetic", action="store_true",
                   help="random images and labels instead of the digits (throughput runs only)")
    g.add_argument("--synthetic-samples", type=int, default=2048)
    g.add_argument("--image-size", type=int, default=None, help="default: 16 (digits), 32 (synthetic)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=16,
                   help="default 16: enough steps (90) in one digits epoch for BatchNorm's running statistics to "
                        "settle; raise it for throughput runs")
    g.add_argument("--lr", type=float, default=0.01, help="peak AdamW learning rate (one-cycle schedule)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (on CUDA; on a CPU it works but is slow)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--save", default=None, metavar="PATH",
                   help="write a checkpoint at the end of every epoch (and of the run); '{epoch}' in PATH keeps one "
                        "file per epoch")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint (or start from a "
                   "bare official/timm state_dict)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar, only the summary lines")
    g = parser.add_argument_group("compare")
    g.add_argument("--compare", action="store_true",
                   help="train fused and reference from the same seed; report agreement and the speedup")
    g.add_argument("--loss-tol", type=float, default=0.1,
                   help="agreement of the final training loss (mean of the last 10%% of steps): |fused - reference| "
                        "<= loss-tol * reference + loss-atol (default 0.1)")
    g.add_argument("--loss-atol", type=float, default=0.05, help="see --loss-tol (default 0.05)")
    g.add_argument("--acc-tol", type=float, default=3.0,
                   help="agreement: test accuracy difference in percentage points (default 3)")


# ------------------------------------------------------------------ progress bar


class Progress:
    """A one-line progress bar on stderr: steps, loss, images/s. Plain lines (every 10%) when not a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last_tenth = -1
        self.last_done = -1

    def due(self, done: int) -> bool:
        """Whether to redraw now (callers read the loss, a GPU sync, only then)."""
        if not self.enabled:
            return False
        if self.tty:
            return time.perf_counter() - self.last_draw >= 0.1
        return (10 * done) // max(self.total, 1) != self.last_tenth

    def update(self, done: int, images: int, loss: Optional[float], final: bool = False) -> None:
        if not self.enabled or (final and not self.tty and self.last_done == done):
            return  # a plain-line bar already printed this state
        self.last_done = done
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


# ------------------------------------------------------------------ training


@dataclass
class History:
    losses: List[float] = field(default_factory=list)  # per optimizer step of this run
    images: int = 0
    seconds: float = 0.0  # steady-state training time (after the warm-up steps)
    steady_images: int = 0
    steady_steps: int = 0
    test_acc: Optional[float] = None
    test_loss: Optional[float] = None
    backends: List[str] = field(default_factory=list)

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


def evaluate(model, split, batch_size: int, device, amp: bool, channels_last: bool):
    from ..datasets import batches

    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad(), _autocast(device, amp):
        for x, y in batches(split, batch_size, shuffle=False, device=device, channels_last=channels_last):
            out = model(x).float()
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
    model.train()
    return 100.0 * correct / len(split), loss_sum / len(split)


def build_model(cfg: dict, fused: bool, backend: str, device, channels_last: bool):
    from .. import ConvMixer

    model = ConvMixer(cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"], n_classes=cfg["n_classes"],
                      in_chans=cfg["in_chans"], activation=cfg["activation"], fused=fused, backend=backend)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def fused_backends_used(model) -> List[str]:
    from ..modules import FusedConvMixerLayer, FusedDepthwiseBlock

    return sorted({m.last_backend for m in model.modules()
                   if isinstance(m, (FusedDepthwiseBlock, FusedConvMixerLayer)) and m.last_backend})


def train_run(model, optimizer, train, test, args, device, *, total_steps: int, start_step: int = 0,
              desc: str = "train", save_fn=None) -> History:
    """Train from ``start_step`` to ``total_steps``; evaluate at the end of every epoch."""
    from ..datasets import batches, steps_per_epoch

    spe = steps_per_epoch(len(train), args.batch_size)
    hist = History()
    progress = Progress(total_steps - start_step, desc, enabled=not args.no_progress)
    warmup = min(2, max(total_steps - start_step - 1, 0))  # steps left out of images/s (first-use compilation)
    step, images = start_step, 0
    loss_acc, loss_n = torch.zeros((), device=device), 0
    losses = []
    measuring, t_mark, img_mark, step_mark = warmup == 0, time.perf_counter(), 0, start_step
    model.train()
    while step < total_steps:
        epoch, skip = divmod(step, spe)
        for x, y in batches(train, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch, device=device,
                            channels_last=args.channels_last, skip=skip):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, args.lr)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, args.amp):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            step += 1
            images += x.shape[0]
            losses.append(loss.detach())
            loss_acc += loss.detach()
            loss_n += 1
            if not measuring and step - start_step >= warmup:
                _sync(device)
                measuring, t_mark, img_mark, step_mark = True, time.perf_counter(), images, step
            if progress.due(step - start_step):
                progress.update(step - start_step, images, float(loss_acc) / loss_n)
                loss_acc.zero_()
                loss_n = 0
            if step >= total_steps:
                break
        if step % spe == 0 or step >= total_steps:  # an epoch ended (or the run): evaluate, save
            _sync(device)
            if measuring:
                hist.seconds += time.perf_counter() - t_mark
                hist.steady_images += images - img_mark
                hist.steady_steps += step - step_mark
            if test is not None:
                hist.test_acc, hist.test_loss = evaluate(model, test, args.batch_size, device, args.amp,
                                                         args.channels_last)
            if save_fn is not None:
                save_fn(step, step // spe)
            t_mark, img_mark, step_mark = time.perf_counter(), images, step
    progress.update(step - start_step, images, float(losses[-1]) if losses else None, final=True)
    hist.losses = [float(v) for v in losses]
    hist.images = images
    hist.backends = fused_backends_used(model)
    return hist


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str, model, optimizer, step: int, epoch: int, cfg: dict, train_cfg: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
            "arch": f"convmixer_{cfg['dim']}_{cfg['depth']}_k{cfg['kernel_size']}_p{cfg['patch_size']}",
            "config": {"model": cfg, "train": train_cfg}, "format": CHECKPOINT_FORMAT}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict as ``save_checkpoint`` writes it; a bare state_dict comes back as {"state_dict": ...}."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint or state_dict (got {type(ckpt).__name__})")
    if "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt}
    try:
        from ..checkpoints import to_official_layout
        ckpt["state_dict"] = to_official_layout(ckpt["state_dict"])
    except ImportError:  # older package without layout conversion: take the keys as they are
        pass
    return ckpt


# ------------------------------------------------------------------ the command


def _data(args):
    from ..datasets import DIGITS_CLASSES, describe, load_digits, synthetic

    if args.synthetic:
        size = args.image_size or 32
        train = synthetic(args.synthetic_samples, size, 3, DIGITS_CLASSES, seed=args.seed)
        return train, None, describe("synthetic (random images and labels)", train, None)
    train, test = load_digits(args.image_size or 16)
    return train, test, describe("handwritten digits (UCI, shipped)", train, test)


def _model_cfg(args, train) -> dict:
    return {"dim": args.dim, "depth": args.depth, "kernel_size": args.kernel_size, "patch_size": args.patch_size,
            "activation": args.activation, "n_classes": 10, "in_chans": int(train.images.shape[1])}


def _check_args(args) -> Optional[str]:
    for name in ("dim", "depth", "kernel_size", "patch_size", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})"
    if args.steps is not None and args.steps < 1:
        return f"--steps must be at least 1 (got {args.steps})"
    if args.batch_size < 2:
        return "--batch-size must be at least 2 (BatchNorm trains on batch statistics)"
    if args.synthetic and args.synthetic_samples < 2:
        return "--synthetic-samples must be at least 2"
    if args.compare and (args.resume or args.save):
        return "--compare trains two fresh models: it takes no --resume or --save"
    return None


def _summary(h: History) -> str:
    parts = [f"final loss {h.losses[-1]:.4f}" if h.losses else "no steps run"]
    if h.test_acc is not None:
        parts.append(f"test accuracy {h.test_acc:.1f}% (loss {h.test_loss:.4f})")
    parts.append(f"{h.images_per_s:,.0f} img/s")
    return ", ".join(parts)


def run(args) -> int:
    from ..backends import BackendUnavailableError

    try:
        return _run(args)
    except BackendUnavailableError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ..datasets import steps_per_epoch

    problem = _check_args(args)
    if problem:
        print(f"train: {problem}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    train, test, data_desc = _data(args)
    cfg = _model_cfg(args, train)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        saved = ckpt.get("config", {}).get("model")
        if saved and saved != cfg:
            print(f"train: model options taken from the checkpoint {args.resume}: {saved}")
            cfg = saved
    spe = steps_per_epoch(len(train), args.batch_size)
    total = args.steps if args.steps is not None else args.epochs * spe
    prec = "bf16 autocast" if args.amp else "fp32"
    print(f"data: {data_desc}; ConvMixer-{cfg['dim']}/{cfg['depth']} k{cfg['kernel_size']} p{cfg['patch_size']} "
          f"{cfg['activation']}; {total} steps of batch {args.batch_size} ({spe} per epoch), {prec}, on {device}",
          flush=True)
    if args.compare:
        return _compare(args, cfg, train, test, device, total)

    torch.manual_seed(args.seed)
    model = build_model(cfg, args.fused, args.backend, device, args.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:  # another model size: say which options would match
            print(f"train: {args.resume} does not fit ConvMixer-{cfg['dim']}/{cfg['depth']} k{cfg['kernel_size']} "
                  f"p{cfg['patch_size']} with {cfg['in_chans']} input channels (set --dim/--depth/--kernel-size/"
                  f"--patch-size to the checkpoint's):\n{e}", file=sys.stderr)
            return 2
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            start = int(ckpt.get("step", 0))
        print(f"resumed from {args.resume} at step {start}")
        if start >= total:
            print(f"train: the checkpoint is at step {start}, the run asks for {total}: nothing to do "
                  "(raise --epochs or --steps)")
            return 0
    train_cfg = {k: getattr(args, k) for k in ("batch_size", "lr", "weight_decay", "seed", "amp", "synthetic")}
    save_fn = None
    if args.save:
        def save_fn(step, epoch):
            save_checkpoint(args.save.format(epoch=epoch), model, optimizer, step, epoch, cfg, train_cfg)
    label = f"{'fused' if args.fused else 'reference'}"
    hist = train_run(model, optimizer, train, test, args, device, total_steps=total, start_step=start, desc=label,
                     save_fn=save_fn)
    ran = f" (fused blocks ran on: {', '.join(hist.backends)})" if args.fused else ""
    print(f"{label}{ran}: {_summary(hist)}", flush=True)
    if args.synthetic:
        print("synthetic data: random labels, so the loss and accuracy mean nothing; the images/s do")
    if args.save:
        print(f"checkpoint: {args.save} (state_dict in the official layout; optimizer, epoch, step alongside)")
    return 0


def _compare(args, cfg, train, test, device, total: int) -> int:
    runs = {}
    for fused in (True, False):
        torch.manual_seed(args.seed)  # the same initial weights: ConvMixer(fused=True) draws exactly as the reference
        model = build_model(cfg, fused, args.backend, device, args.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        runs[fused] = train_run(model, optimizer, train, test, args, device, total_steps=total,
                                desc="fused" if fused else "reference")
    f, r = runs[True], runs[False]
    first_tol = 2e-2 if args.amp else 1e-3
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
    speedup = f.images_per_s / r.images_per_s if r.images_per_s > 0 else float("nan")
    print(f"{'AGREE' if agree else 'DISAGREE'}: fused and reference training "
          f"{'agree' if agree else 'do not agree'} within the tolerances; speedup {speedup:.2f}x "
          f"({f.images_per_s:,.0f} vs {r.images_per_s:,.0f} img/s, steady state after the warm-up steps)")
    if min(f.steady_steps, r.steady_steps) < 20:
        print(f"note: only {min(f.steady_steps, r.steady_steps)} steps were timed, so the speedup is mostly noise")
    if f.backends == ["torch"]:
        print("note: the fused blocks ran on the torch backend (the reference composition; what 'auto' picks on "
              "a CPU), so expect identical results and a speedup near 1x")
    return 0 if agree else 1
