"""Resumable pre-training checkpoints and the append-only ``train_log.jsonl``.

A checkpoint holds everything that determines the rest of a run: model, optimiser, scheduler and
grad-scaler states, the step, every rank's RNG states and the sampler's identity. It is written
atomically (:func:`fseft.io_utils.save_torch_atomic`), so a process killed while writing leaves the
previous checkpoint intact, and it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io_utils import save_torch_atomic, write_text_atomic
from ..models.checkpoint import safe_torch_load

log = logging.getLogger(__name__)

#: format tag stored in (and required of) every pre-training checkpoint.
CHECKPOINT_FORMAT = "fseft-pretrain-checkpoint/1"
#: file names inside a run's output folder.
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; ``state`` must hold only ``weights_only``-loadable values.

    Args:
        path: Destination file.
        state: Keys ``step``, ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``sampler``,
            ``config`` (others are kept as they are).
    """
    save_torch_atomic({"format": CHECKPOINT_FORMAT, **state}, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on CPU).

    Raises:
        CheckpointError: if the file is unreadable, unsafe to unpickle or not a pre-training checkpoint.
    """
    p = Path(path)
    state = safe_torch_load(p)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not an fseft pre-training checkpoint ({CHECKPOINT_FORMAT})")
    return state


def check_resume_config(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise unless the configuration a checkpoint was trained with matches this run's.

    Raises:
        CheckpointError: naming the first differing option.
    """
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{path}: checkpoint has {key}={saved.get(key)!r} but this run has {current.get(key)!r}; "
                "an exact resume needs the same configuration"
            )


class TrainLog:
    """``train_log.jsonl``: one JSON record per line, appended with flush + fsync.

    A crash can leave at most a torn last line; :meth:`rewind` (called on resume) rewrites the file
    atomically keeping only the complete records up to the checkpoint's step, so a resumed run's log
    reads as if the run had never stopped.

    Args:
        path: The log file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        """The complete records in the file (a torn or corrupt line is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def rewind(self, step: int) -> None:
        """Keep only the records with ``record["step"] <= step`` (none when a run starts afresh)."""
        kept = [r for r in self.records() if int(r.get("step", 0)) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        log.debug("train log rewound to step %d (%d records)", step, len(kept))
