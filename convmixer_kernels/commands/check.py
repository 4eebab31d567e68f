"""``check``: train a small ConvMixer a few steps fused and unfused and compare everything.

Outputs, the input gradient, every parameter gradient and every BatchNorm buffer
are compared with the precision rule of design.md section 6 (``verify.py``), in
training and then eval mode. Exit status 1 if anything is off; 2 (one line on stderr) for
options that cannot run here.
"""
from __future__ import annotations

import sys

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                        help="auto (default), torch, triton or cuda")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="float32 model under bf16 autocast")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activation", default="gelu", choices=["gelu", "gelu_tanh", "relu"])
    parser.add_argument("--all", action="store_true", help="print every comparison, not only failures")


class CheckError(Exception):
    """Options that cannot run here: printed as one line, exit status 2."""


def _device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CheckError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckError(f"--device {name}: torch.cuda.is_available() is False"
                         + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"))
    if device.type not in ("cpu", "cuda"):
        raise CheckError(f"--device {name}: only cpu and cuda are supported")
    return device


def _check_options(args) -> None:
    for name in ("dim", "depth", "kernel_size", "patch_size", "image_size", "batch", "steps"):
        if getattr(args, name) < 1:
            raise CheckError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.image_size < args.patch_size:
        raise CheckError(f"--image-size {args.image_size} is smaller than --patch-size {args.patch_size}")


def run(args) -> int:
    from ..backends import BackendUnavailableError

    try:
        _check_options(args)
        return _run(args, _device(args.device))
    except (CheckError, BackendUnavailableError) as e:
        print(f"check: {e}", file=sys.stderr)
        return 2


def _run(args, device) -> int:
    from .. import ConvMixer, fuse_convmixer
    from ..modules import FusedConvMixerLayer
    from ..verify import compare_train_then_eval, format_rows, three_copies

    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    reference = ConvMixer(args.dim, args.depth, args.kernel_size, args.patch_size, n_classes=10,
                          activation=args.activation)
    fused, ref_d, ref64 = three_copies(reference, lambda m: fuse_convmixer(m, backend=args.backend), dtype, device)
    inputs = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
              for _ in range(args.steps)]
    autocast = torch.bfloat16 if args.autocast else None
    rows = compare_train_then_eval(fused, ref_d, ref64, inputs, inputs[:1], dtype, autocast)
    ran = sorted(({m.last_backend for m in fused.modules() if isinstance(m, FusedConvMixerLayer)}
                  | {m[0].last_backend for m in fused.modules() if isinstance(m, FusedConvMixerLayer)}) - {None})
    failures = [r for r in rows if not r.ok]
    print(f"ConvMixer-{args.dim}/{args.depth} k{args.kernel_size} p{args.patch_size}, {args.activation}, "
          f"batch {args.batch} at {args.image_size}x{args.image_size}, {args.dtype}"
          f"{' under bf16 autocast' if autocast else ''}, on {device}; fused blocks ran on: {', '.join(ran)}")
    print(format_rows(rows, only_failures=not args.all))
    print(f"{len(rows) - len(failures)} of {len(rows)} comparisons within the precision rule "
          f"({args.steps} training steps and one eval step)")
    return 1 if failures else 0
