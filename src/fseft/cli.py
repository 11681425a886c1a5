"""The ``fseft`` command: one entry point, one module per subcommand under ``fseft.commands``.

Every user-caused error (:class:`fseft.errors.FseftError`) becomes a single ``fseft: error: ...``
line on stderr and a non-zero exit code; no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import FseftError

#: subcommand name -> module under fseft.commands (imported lazily so ``--help`` stays fast).
COMMANDS: dict[str, str] = {
    "adapt": "adapt",
    "benchmark": "benchmark",
    "check-data": "check_data",
    "demo": "demo",
    "evaluate": "evaluate",
    "methods": "methods",
    "predict": "predict",
    "pretrain": "pretrain",
    "report": "report",
    "synth": "synth",
    "zoo": "zoo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fseft",
        description="Adapt a volumetric CT segmentation foundation model to a new organ or task "
        "from a handful of labelled scans (few-shot, parameter-efficient).",
        epilog="Run 'fseft COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"fseft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"fseft.commands.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("nibabel.global").propagate = False  # nibabel prints its header warnings itself
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except FseftError as e:
        if args.debug:
            raise
        print(f"fseft: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fseft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
