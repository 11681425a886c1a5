"""Typed configuration dataclasses shared across stages, with dict/YAML round-trips.

Configs are validated once (in ``__post_init__``) and treated as immutable afterwards.
Stage-specific configs (training, adaptation) live beside their stage and reuse
:func:`to_dict` / :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT volume becomes a model input (paper defaults).

    Args:
        orientation: Axis codes the volume is reoriented to (``"RAS"``).
        spacing: Target voxel spacing in mm, one value per axis.
        hu_window: Hounsfield range clipped and scaled linearly to ``[0, 1]``.
        roi: Patch size (voxels) the network sees; volumes smaller than it are padded.
        crop_foreground: Crop to the body (voxels above the window's lower bound) before patching.
        num_samples: Random crops drawn per volume per step during training.
        pos: Relative weight of crops centred on a labelled voxel.
        neg: Relative weight of crops centred on a background voxel.
        augment: Apply the paper's training augmentations (flips, 90 degree rotations, intensity shift).
        spatial_augment: With ``augment``, include the flips and 90 degree rotations. Turn off for
            models with left/right structures (parotids, kidneys): a left-right flip or an axial
            rotation moves a left organ to where the right one belongs, under the left label.
    """

    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, float] = (-175.0, 250.0)
    roi: tuple[int, int, int] = (96, 96, 96)
    crop_foreground: bool = True
    num_samples: int = 6
    pos: float = 1.0
    neg: float = 1.0
    augment: bool = True
    spatial_augment: bool = True

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or any(s <= 0 or s > 50 for s in self.spacing):
            raise ConfigError(f"spacing must be three values in (0, 50] mm, got {self.spacing}")
        if len(self.roi) != 3 or any(int(r) < 1 for r in self.roi):
            raise ConfigError(f"roi must be three positive sizes, got {self.roi}")
        lo, hi = self.hu_window
        if not lo < hi:
            raise ConfigError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if self.num_samples < 1 or self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise ConfigError("num_samples must be >= 1 and pos/neg non-negative with a positive sum")
        if len(self.orientation) != 3:
            raise ConfigError(f"orientation must be three axis codes like 'RAS', got {self.orientation!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-able dict of a (nested) config dataclass; tuples become lists."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build config ``cls`` from a dict, converting lists back to tuples and nested dicts to dataclasses.

    Raises:
        ConfigError: on unknown keys (listing the valid ones) or invalid values.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}") from None


def _coerce(tp: Any, v: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(v, dict):
        return from_dict(tp, v)
    if origin is tuple and isinstance(v, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], x) for x in v)
        return tuple(_coerce(a, x) for a, x in zip(args, v, strict=False)) if args else tuple(v)
    if origin in (typing.Union, types.UnionType):
        if v is None:
            return None
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a) and isinstance(v, dict):
                return from_dict(a, v)
            if typing.get_origin(a) is tuple and isinstance(v, (list, tuple)):
                return _coerce(a, v)
        return v
    if tp is float and isinstance(v, int):
        return float(v)
    return v


def load_yaml(path: str | Path, what: str = "config", *, allow_list: bool = False) -> Any:
    """Read a YAML mapping (or, with ``allow_list``, a mapping or a list).

    Raises:
        ConfigError: naming the file when it is missing, unreadable or of the wrong shape.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
        raise ConfigError(f"{p}: expected a mapping at the top level" + (" or a list" if allow_list else ""))
    return data


__all__ = ["PreprocessConfig", "to_dict", "from_dict", "load_yaml", "field"]
