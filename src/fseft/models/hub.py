"""The model hub: one place that turns a name into a model (a file, a registered spec or a zoo name).

It sits above :mod:`.checkpoint` (model files) and :mod:`.zoo` (public checkpoints), which know
nothing of each other or of names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..defaults import DEFAULT_MODEL
from ..errors import CheckpointError, ConfigError
from ..registry import Registry
from . import zoo
from .checkpoint import load_model_file
from .foundation import FoundationModel


@dataclass(frozen=True)
class ModelSpec:
    """A named model (timm-style): weights, preprocessing and label template travel together.

    Args:
        name: Registry name, e.g. ``unet-small.synth``.
        source: An fseft model file, or a zero-argument builder returning a ready model.
        description: One line for listings.
    """

    name: str
    source: Path | Callable[[], FoundationModel]
    description: str = ""


MODELS: Registry[ModelSpec] = Registry("model")


def register_model_spec(
    name: str, source: str | os.PathLike[str] | Callable[[], FoundationModel], description: str = ""
) -> ModelSpec:
    """Register a named model for :func:`load_model`.

    Raises:
        ConfigError: when ``name`` is already registered.
    """
    src = source if callable(source) else Path(source)
    return MODELS.add(name, ModelSpec(name, src, description))


def model_available(name: str) -> bool:
    """True for a registered model, a zoo name or an existing file."""
    return name in MODELS or name in zoo.ZOO or Path(name).is_file()


def model_or_default(name: str | None) -> str:
    """``name``, or :data:`~fseft.defaults.DEFAULT_MODEL` when none is given and it is registered.

    Raises:
        ConfigError: no name and no bundled default, listing the registered models.
    """
    if name is not None:
        return name
    if DEFAULT_MODEL in MODELS:
        return DEFAULT_MODEL
    raise ConfigError(
        f"--model is required: the bundled model {DEFAULT_MODEL!r} is not registered "
        f"(registered models: {', '.join(MODELS.names()) or 'none'}); pass --model FILE or NAME (see 'fseft zoo list')"
    )


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    structures: tuple[str, ...] | None = None,
    allow_partial: bool = False,
) -> FoundationModel:
    """Load a model from a file, a registered model name, or a downloaded zoo checkpoint name.

    Args:
        name_or_path: An fseft model file, a :func:`register_model_spec` name, or a zoo name
            (:mod:`fseft.models.zoo`; the checkpoint must have been downloaded).
        map_location: Device the returned model lives on.
        structures: The head of a zoo checkpoint that has none (its rows untrained: adaptation
            trains them); ignored for every other model, whose head is its own.
        allow_partial: Load even when keys are missing, unexpected or mismatched beyond what the
            layout expects (:func:`~fseft.models.checkpoint.load_pretrained`).

    Raises:
        CheckpointError: unsafe/unreadable/mismatched file, or a zoo checkpoint not downloaded yet.
        ConfigError: an unknown name (listing registered models and zoo names).
    """
    p = Path(name_or_path)
    key = str(name_or_path)
    if p.is_file():
        model = load_model_file(p, allow_partial=allow_partial)
    elif key in MODELS:
        src = MODELS.get(key).source
        model = load_model_file(src, allow_partial=allow_partial) if isinstance(src, Path) else src()
    elif key in zoo.ZOO:
        headless = not zoo.get_entry(key).structures
        model = zoo.load_zoo_model(key, structures=structures if headless else None, allow_partial=allow_partial)
    elif os.sep in key or p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise CheckpointError(f"{p}: model file not found")
    else:
        raise ConfigError(
            f"unknown model {key!r}: not a file; registered models: {', '.join(MODELS.names()) or '(none)'}; "
            f"zoo: {', '.join(zoo.ZOO.names())}"
        )
    return model.to(torch.device(map_location))


__all__ = ["MODELS", "ModelSpec", "load_model", "model_available", "model_or_default", "register_model_spec"]
