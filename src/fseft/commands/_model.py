"""Loading the model a command runs on, with the load report shown as warnings (one line per kind)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

ALLOW_PARTIAL_HELP = (
    "load a checkpoint whose keys do not all fit its layout (missing, unexpected or mismatched "
    "weights stay at initialisation); without it such a load fails, naming the keys"
)


def add_allow_partial(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow-partial-load``."""
    parser.add_argument("--allow-partial-load", action="store_true", help=ALLOW_PARTIAL_HELP)


def load_cli_model(name: str, *, structures: tuple[str, ...] | None = None, allow_partial: bool = False) -> Any:
    """:func:`fseft.models.load_model`, printing the load report's warnings to stderr.

    Args:
        name: Model file, registered name or zoo name.
        structures: Head of a zoo checkpoint without one (ignored otherwise).
        allow_partial: ``--allow-partial-load``.
    """
    from ..models import load_model

    model = load_model(name, structures=structures, allow_partial=allow_partial)
    for line in model.extra.get("load_warnings", ()):
        print(f"fseft: warning: {line}", file=sys.stderr)
    return model
