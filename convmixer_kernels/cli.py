"""``convmixer-kernels <command>`` (also ``python -m convmixer_kernels <command>``).

Each command lives in ``convmixer_kernels/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> one-line help; the module is convmixer_kernels.commands.<name>
COMMANDS = {
    "info": "versions, devices, and which backends can run (and why the others cannot)",
    "check": "a short fused-vs-reference check (outputs, gradients, BatchNorm buffers) on this machine",
    "train": "train a ConvMixer (shipped digits, CIFAR-10 or an image folder; one process or torchrun), fused or "
             "not; --compare",
    "profile": "large-kernel depthwise sweep (k = 3..31, shapes, dtypes, layouts) for every provider (CUDA)",
    "inspect": "static sm_90 evidence without a GPU: registers, spills, SASS mix, predicted time (static prediction)",
    "bench": "run the benchmark suite, pytest bench/ (CUDA), with pass-through pytest arguments",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the full usage is one ``--help`` away), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DedupeFilter(logging.Filter):
    """Lets a message through the first time, then only at its 10th, 100th, 1000th... repeat (with
    the count): a per-call debug line (a backend choice) would otherwise print once per forward."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        n = self.seen.get(key, 0) + 1
        self.seen[key] = n
        if n == 1:
            return True
        if n >= 10 and str(n).rstrip("0") == "1":  # 10, 100, 1000, ...
            record.msg, record.args = f"{key[2]} [seen {n} times; repeats are shown at the 10th, 100th, ...]", None
            return True
        return False


def setup_logging(verbose: bool) -> None:
    """INFO (DEBUG with -v) on stderr, identical lines deduplicated; under torchrun only rank 0 logs
    below WARNING, and other ranks' lines say which rank they come from."""
    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else 0
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(levelname)s %(name)s: %(message)s"
    if rank > 0:
        level, fmt = max(level, logging.WARNING), f"[rank {rank}] {fmt}"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(DedupeFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_convmixer_kernels", False):  # main() called again in one process (tests)
            root.removeHandler(h)
    handler._convmixer_kernels = True
    root.addHandler(handler)
    root.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convmixer-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows backend choices)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=f"convmixer_kernels.commands.{name}")
        importlib.import_module(f"convmixer_kernels.commands.{name}").add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
