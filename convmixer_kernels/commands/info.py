"""``info``: versions, devices and backend availability."""
from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="device to check backends for (default: cuda if present, else cpu)")


def collect(device=None) -> dict:
    import torch

    from .. import __version__, backends

    info = {
        "convmixer_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # not installed or broken
        info["triton"] = f"unavailable ({type(e).__name__}: {e})"
    info["TRITON_INTERPRET"] = "on" if backends.triton_interpreting() else "off"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info[f"GPU {i}"] = f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    else:
        info["GPU"] = "none"
    from .. import _cuda_ext
    info["CUDA extension"] = _cuda_ext.load_error() or "loaded"
    dev = torch.device(device) if device else None
    reasons = backends.explain_backends(dev)
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        # no backend can run on a device that does not exist, whatever its own checks say
        why = ("torch.cuda.is_available() is False" + ("" if torch.version.cuda else
               f" (torch {torch.__version__} is a CPU build)"))
        reasons = {name: reason or why for name, reason in reasons.items()}
    info["backends"] = reasons
    return info


def run(args) -> int:
    import sys

    try:
        info = collect(args.device)
    except RuntimeError as e:  # torch.device("foo")
        print(f"info: --device {args.device}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    reasons = info.pop("backends")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\nbackends ('auto' tries them in this order):")
    for name, reason in reasons.items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0
