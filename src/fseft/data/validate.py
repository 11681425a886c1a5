"""The one validation step every CT goes through before it is resampled: no silent wrong answers.

Checked, in this order, each problem one clause of a single :class:`~fseft.errors.DataError` line
that names the file (``fseft check-data`` reports each as an error instead):

* **finite voxels**: NaN, +inf and -inf are all refused (with their counts). Interpolation spreads a
  NaN over its neighbours and turns an infinity next to any finite value into NaN, so a silent
  repair (clipping to the HU window, filling) would still change the segmentation around them;
* **an invertible affine** (finite entries, no zero voxel size, no degenerate direction);
* **a plausible CT voxel size**: every spacing within ``[0.1, 20]`` mm by default;
* **a bounded resampled size** (when the model's target spacing is known): the volume resampled to
  that spacing must hold at most ``2**29`` voxels (2 GiB as float32) by default, refused before
  anything is allocated.

Limits are overridable through the environment: ``FSEFT_SPACING_RANGE="LOW,HIGH"`` (mm) and
``FSEFT_MAX_RESAMPLED_VOXELS=N``. :func:`validate_ct` runs where a CT enters the preprocessing: in
:func:`fseft.data.io.load_case` (training and evaluation cases, right after the image is read and
before its labels) and :func:`fseft.inference.predictor.preprocess_image` (images to predict), so
every command that reads a CT for a model (``predict``, ``adapt``, ``pretrain``, ``benchmark``,
``demo``) refuses the same inputs the same way, and :mod:`fseft.data.check` reports them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..config import PreprocessConfig
from ..errors import ConfigError, DataError
from .image import Image

SPACING_ENV = "FSEFT_SPACING_RANGE"
MAX_VOXELS_ENV = "FSEFT_MAX_RESAMPLED_VOXELS"


@dataclass(frozen=True)
class CTLimits:
    """What a CT must satisfy.

    Args:
        spacing_mm: Smallest and largest plausible voxel size (mm), inclusive.
        max_resampled_voxels: Most voxels the volume may hold once resampled to the model's spacing.

    Raises:
        ConfigError: on an empty or non-positive range, or a non-positive voxel bound.
    """

    spacing_mm: tuple[float, float] = (0.1, 20.0)
    max_resampled_voxels: int = 2**29

    def __post_init__(self) -> None:
        low, high = self.spacing_mm
        if not 0 < low <= high or not math.isfinite(high):
            raise ConfigError(f"spacing range must be 0 < LOW <= HIGH mm, got {self.spacing_mm}")
        if self.max_resampled_voxels < 1:
            raise ConfigError(f"the resampled voxel bound must be >= 1, got {self.max_resampled_voxels}")

    @classmethod
    def from_env(cls) -> CTLimits:
        """The defaults, overridden by ``$FSEFT_SPACING_RANGE`` and ``$FSEFT_MAX_RESAMPLED_VOXELS``.

        Raises:
            ConfigError: naming the variable when its value cannot be parsed.
        """
        default = cls()
        spacing, voxels = os.environ.get(SPACING_ENV), os.environ.get(MAX_VOXELS_ENV)
        try:
            low, high = (float(v) for v in spacing.split(",")) if spacing else default.spacing_mm
        except ValueError:
            raise ConfigError(
                f"{SPACING_ENV}={spacing!r}: expected 'LOW,HIGH' in mm, e.g. '0.1,20'"
            ) from None
        try:
            bound = int(voxels) if voxels else default.max_resampled_voxels
        except ValueError:
            raise ConfigError(f"{MAX_VOXELS_ENV}={voxels!r}: expected a whole number of voxels") from None
        try:
            return cls((low, high), bound)
        except ConfigError as e:
            raise ConfigError(f"{SPACING_ENV} / {MAX_VOXELS_ENV}: {e}") from None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def finite_problem(array: np.ndarray) -> str | None:
    """``"N NaN voxel(s) ..."`` when ``array`` holds NaN or infinite values."""
    if array.dtype.kind not in "fc" or bool(np.isfinite(array).all()):
        return None
    nan = int(np.isnan(array).sum())
    pos, neg = int(np.isposinf(array).sum()), int(np.isneginf(array).sum())
    counts = [f"{n} {what}" for n, what in ((nan, "NaN"), (pos, "+inf"), (neg, "-inf")) if n]
    return f"{' and '.join(counts)} voxel(s): CT values must be finite (fix or replace them in the file)"


def affine_problem(affine: np.ndarray) -> str | None:
    """A reason when the voxel -> world matrix cannot be inverted (zero voxel size, degenerate axes)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(affine).all():
        return "the affine holds NaN or infinite values"
    sizes = np.linalg.norm(linear, axis=0)
    if (sizes == 0).any() or abs(np.linalg.det(linear)) <= 1e-9 * float(np.prod(sizes)):
        return (
            f"the affine is not invertible (voxel spacing {_fmt(sizes)} mm: a zero pixdim or degenerate axes)"
        )
    return None


def spacing_problem(spacing: Sequence[float], limits: CTLimits) -> str | None:
    """A reason when a voxel size lies outside ``limits.spacing_mm``."""
    low, high = limits.spacing_mm
    if all(low <= s <= high for s in spacing):
        return None
    return (
        f"voxel spacing {_fmt(spacing)} mm is outside the plausible CT range {low:g}-{high:g} mm "
        f"(set {SPACING_ENV}=LOW,HIGH to accept it)"
    )


def resampled_shape(image: Image, spacing: Sequence[float], orientation: str) -> tuple[int, int, int]:
    """The shape ``image`` takes once reoriented to ``orientation`` and resampled to ``spacing`` (mm)."""
    target = nib.orientations.axcodes2ornt(tuple(orientation))
    world_to_target = {int(world): axis for axis, (world, _) in enumerate(target)}
    size = [0, 0, 0]
    for axis, (world, _) in enumerate(nib.orientations.io_orientation(image.affine)):
        out = world_to_target[int(world)]
        size[out] = max(1, round(image.shape[axis] * image.spacing[axis] / spacing[out]))
    return size[0], size[1], size[2]


def resampled_problem(
    image: Image, spacing: Sequence[float], orientation: str, limits: CTLimits
) -> str | None:
    """A reason when resampling ``image`` to ``spacing`` would exceed ``limits.max_resampled_voxels``."""
    shape = resampled_shape(image, spacing, orientation)
    voxels = math.prod(shape)
    if voxels <= limits.max_resampled_voxels:
        return None
    return (
        f"resampling to the model's {_fmt(spacing)} mm spacing would give {shape} = {voxels:,} voxels, over the "
        f"limit of {limits.max_resampled_voxels:,} (set {MAX_VOXELS_ENV} to raise it)"
    )


def ct_problems(
    image: Image, limits: CTLimits | None = None, *, preprocess: PreprocessConfig | None = None
) -> list[str]:
    """Every problem of a CT (empty when it is fine to use).

    Args:
        image: The CT as read (HU).
        limits: What to enforce (default: :meth:`CTLimits.from_env`).
        preprocess: The model's preprocessing (its spacing and orientation give the resampled size);
            ``None`` skips the resampled-size bound.

    Returns:
        One clause per problem, without the file name.
    """
    limits = limits or CTLimits.from_env()
    # a singular affine has no meaningful spacing, and an implausible spacing no meaningful resampled size
    geometry = affine_problem(image.affine) or spacing_problem(image.spacing, limits)
    if geometry is None and preprocess is not None:
        geometry = resampled_problem(image, preprocess.spacing, preprocess.orientation, limits)
    return [p for p in (finite_problem(image.array), geometry) if p is not None]


def validate_ct(
    image: Image, limits: CTLimits | None = None, *, preprocess: PreprocessConfig | None = None
) -> Image:
    """Refuse a CT that would give a silently wrong (or never-ending) result.

    Args:
        image: The CT as read (HU).
        limits: What to enforce (default: :meth:`CTLimits.from_env`).
        preprocess: The model's preprocessing; ``None`` skips the resampled-size bound.

    Returns:
        ``image`` itself.

    Raises:
        DataError: ``"PATH: problem; problem"``, every problem of the image in one line.
    """
    problems = ct_problems(image, limits, preprocess=preprocess)
    if problems:
        raise DataError(f"{image.name}: {'; '.join(problems)}")
    return image


__all__ = [
    "MAX_VOXELS_ENV",
    "SPACING_ENV",
    "CTLimits",
    "affine_problem",
    "ct_problems",
    "finite_problem",
    "resampled_problem",
    "resampled_shape",
    "spacing_problem",
]
