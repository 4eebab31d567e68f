"""``convmixer-kernels <command>`` (also ``python -m convmixer_kernels <command>``).

Each command lives in ``convmixer_kernels/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> one-line help; the module is convmixer_kernels.commands.<name>
COMMANDS = {
    "info": "versions, devices, and which backends can run (and why the others cannot)",
    "check": "a short fused-vs-reference check (outputs, gradients, BatchNorm buffers) on this machine",
    "train": "train a ConvMixer on the shipped handwritten digits (or synthetic data), fused or not; --compare",
    "profile": "large-kernel depthwise sweep (k = 3..31, shapes, dtypes, layouts) for every provider (CUDA)",
    "inspect": "static sm_90 evidence without a GPU: registers, spills, SASS mix, predicted time (static prediction)",
    "bench": "run the benchmark suite, pytest bench/ (CUDA), with pass-through pytest arguments",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convmixer-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows backend choices)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=f"convmixer_kernels.commands.{name}")
        importlib.import_module(f"convmixer_kernels.commands.{name}").add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
