"""Planning a command's outputs before any work starts, so no work is lost to an unwritable output.

:func:`plan_outputs` is called at the start of every command that writes files: each output file
(and sibling such as ``<out>.record.json``) must not exist unless replacing it was asked for, must not
be a folder, and must be creatable (no file in the way of its folders; the nearest existing folder
accepts a new file, probed by creating and removing a temporary file, which also catches read-only
mounts and permission rules ``os.access`` misses).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything)."""
    current = path
    while not current.exists() and not current.is_symlink() and current != current.parent:
        current = current.parent
    return current


def check_writable(folder: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None) -> None:
    """Raise unless files can be created in ``folder`` (created later if missing).

    Args:
        folder: Folder the output goes into.
        output: The output named in the error (default: ``folder``).

    Raises:
        OutputError: naming the output when a file stands where a folder is needed, or the nearest
            existing folder does not accept new files.
    """
    target = Path(output) if output is not None else Path(folder)
    anchor = _existing_ancestor(Path(folder).absolute())
    if not anchor.is_dir():
        raise OutputError(f"{target}: cannot be created: {anchor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=anchor, prefix=".fseft-write-check."):
            pass
    except OSError as e:
        raise OutputError(f"{target}: cannot write in {anchor} ({e.strerror or e})") from None


def plan_outputs(
    files: Iterable[str | os.PathLike[str]] = (),
    *,
    folders: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    hint: str = "pass --overwrite to replace it",
) -> None:
    """Refuse, before any work, outputs that exist or cannot be written.

    Args:
        files: Output files; an existing one is refused unless ``overwrite``.
        folders: Output folders (existing ones are fine: what goes inside is checked by the caller).
        overwrite: Existing files may be replaced.
        hint: What to do about an existing file, ending the error line.

    Raises:
        OutputError: naming the first output that exists (without ``overwrite``), is a folder where a
            file is expected (or the reverse), or cannot be created.
    """
    for raw in files:
        path = Path(raw)
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; expected a file name")
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: already exists; {hint}")
        check_writable(path.parent, output=path)
    for raw in folders:
        path = Path(raw)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: is a file; expected a folder")
        check_writable(path)


__all__ = ["check_writable", "plan_outputs"]
