"""Atomic writes: a file appears complete under its final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Marks the temporary names of :func:`atomic_path` (``.<name>.<random>.tmp<suffixes>``).
_TMP = ".tmp"


def is_unfinished(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_path`: a write in progress (perhaps by
    another process) or one left by a killed process. Its name may still match a glob such as
    ``*.json``, so readers of a folder that others write into skip it."""
    name = Path(path).name
    return name.startswith(".") and _TMP in name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.pt``) so writers that infer the
    format from the extension behave the same.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f"{_TMP}{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 (and some writers recreate the file): give every output the
        # permissions a plain open() would have, whoever wrote it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if absent) for the block; yields whether it was taken.

    The operating system releases the lock when its holder exits, crash included, so a lock never
    outlives the process that took it. ``wait=False``: a lock held by another process yields False
    at once. On platforms without ``fcntl`` (Windows) nothing is locked and True is yielded.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; callers then rely on disjoint work (shards)
        yield True
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
