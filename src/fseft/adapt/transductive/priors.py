"""Anatomical size priors learnt from the k support masks, for constrained transductive inference.

Silva-Rodríguez, Dolz & Ben Ayed (MedIA 2025) correct a black-box adapter at test time with a prior
on the size of the target. The prior is measured where the model works: on the *preprocessed*
support volumes (model voxel space: reoriented, resampled, HU-windowed, cropped to the body and
padded, exactly what the trainer sees), so it is directly comparable with what the model predicts
on a preprocessed query.

For each target structure and each support volume:

1. keep the largest connected component of the structure's mask (26-connectivity), as the
   reference code does, so stray labelled voxels do not inflate the size;
2. its volume, in voxels and in ml (voxels times the model's voxel volume);
3. its *proportion* of the body: ``|mask ∩ body| / |body|`` with ``body = image > 0`` (the voxels
   above the lower bound of the HU window, i.e. the same foreground the body crop uses). The
   proportion is more stable across fields of view than the absolute volume, and it is what the
   query-time estimator measures (mean probability over the body), so both count the same voxels.

With ``k >= 5`` support volumes, values outside ``median ± one standard deviation`` of the
proportions are discarded before averaging (the reference code's rule); the same cases are kept for
the volume. With fewer, all values are averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ...errors import CheckpointError, ConfigError, DataError
from ..support import SupportVolume

logger = logging.getLogger(__name__)

#: Fewest support values for which outliers are discarded.
MIN_FOR_OUTLIERS = 5


@dataclass(frozen=True)
class SizePrior:
    """Expected size of one target structure in the model's voxel space.

    Args:
        structure: Canonical structure name.
        proportion: Mean fraction of the body (``image > 0``) the structure occupies.
        volume_ml: Mean volume of its largest connected component, in ml.
        volume_voxels: The same in model voxels.
        n_used: Support volumes averaged (after outlier removal).
        values: The proportion measured on every support volume, in support order.
        kept: Whether each of ``values`` was averaged (False: discarded as an outlier).

    Raises:
        ConfigError: on a non-positive proportion or inconsistent counts.
    """

    structure: str
    proportion: float
    volume_ml: float
    volume_voxels: float
    n_used: int
    values: tuple[float, ...]
    kept: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not 0.0 < self.proportion <= 1.0:
            raise ConfigError(
                f"size prior of {self.structure}: proportion must be in (0, 1], got {self.proportion}"
            )
        if len(self.values) != len(self.kept) or self.n_used != sum(self.kept) or self.n_used < 1:
            raise ConfigError(f"size prior of {self.structure}: values, kept and n_used disagree")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = asdict(self)
        out["values"], out["kept"] = list(self.values), list(self.kept)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SizePrior:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: on missing/unknown keys or invalid values.
        """
        try:
            return cls(
                structure=str(data["structure"]),
                proportion=float(data["proportion"]),
                volume_ml=float(data["volume_ml"]),
                volume_voxels=float(data["volume_voxels"]),
                n_used=int(data["n_used"]),
                values=tuple(float(v) for v in data["values"]),
                kept=tuple(bool(v) for v in data["kept"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid size prior {dict(data)!r}: {e}") from None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean 3-D mask (empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def body_mask(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Body voxels of a preprocessed ``[1, X, Y, Z]`` (or ``[X, Y, Z]``) image: ``image > 0``."""
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return array.reshape(array.shape[-3:]) > 0


def robust_mean(values: Sequence[float]) -> tuple[float, tuple[bool, ...]]:
    """Mean of ``values`` without those outside ``median ± std`` (only when there are at least 5).

    Returns:
        ``(mean, kept flags)``. The middle value(s) always lie within one standard deviation of the
        median, so at least one value is kept.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < MIN_FOR_OUTLIERS:
        return float(v.mean()), (True,) * v.size
    median, std = np.median(v), v.std()
    kept = np.abs(v - median) <= std
    return float(v[kept].mean()), tuple(bool(x) for x in kept)


def measure(image: torch.Tensor, mask: np.ndarray) -> tuple[int, float]:
    """Voxels of the largest component of ``mask`` and its proportion of the body of ``image``.

    Args:
        image: ``[1, X, Y, Z]`` preprocessed image.
        mask: ``[X, Y, Z]`` boolean structure mask.

    Returns:
        ``(voxels, proportion)``; proportion 0 when the image has no body voxel.
    """
    body = body_mask(image)
    component = largest_component(mask)
    inside = int(np.count_nonzero(component & body))
    total = int(np.count_nonzero(body))
    return int(np.count_nonzero(component)), (inside / total if total else 0.0)


def size_priors(
    volumes: Sequence[SupportVolume], structures: Sequence[str], spacing: Sequence[float]
) -> tuple[SizePrior, ...]:
    """One :class:`SizePrior` per target structure from the preprocessed support volumes.

    Args:
        volumes: The support volumes (labels: ``i + 1`` is ``structures[i]``).
        structures: Target structures, in label order.
        spacing: Model voxel spacing in mm (``PreprocessConfig.spacing``).

    Returns:
        The priors, in ``structures`` order.

    Raises:
        ConfigError: on an empty support.
        DataError: when a structure is absent from every support volume (naming it).
    """
    if not volumes:
        raise ConfigError("size priors need at least one support volume")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    priors = []
    for i, name in enumerate(structures):
        sizes, props = [], []
        for v in volumes:
            voxels, proportion = measure(v.image, v.label.numpy().reshape(v.label.shape[-3:]) == i + 1)
            sizes.append(voxels)
            props.append(proportion)
        if not any(p > 0 for p in props):
            ids = ", ".join(v.case_id for v in volumes)
            raise DataError(
                f"no support volume ({ids}) contains {name} inside the body; cannot learn its size"
            )
        proportion, kept = robust_mean(props)
        voxels = float(np.mean([s for s, k in zip(sizes, kept, strict=True) if k]))
        priors.append(SizePrior(name, proportion, voxels * voxel_ml, voxels, sum(kept), tuple(props), kept))
        logger.info(
            "size prior of %s: %.4f of the body, %.1f ml (%d of %d support volumes)",
            name, proportion, voxels * voxel_ml, sum(kept), len(volumes),
        )  # fmt: skip
    return tuple(priors)


#: Key of the priors in an adapter file's header (a format field since header version 2) and in run records.
PRIORS_KEY = "size_priors"


def priors_to_record(priors: Sequence[SizePrior]) -> dict[str, Any]:
    """``{"size_priors": [...]}``: the priors as JSON, for a run record or an adapter header."""
    return {PRIORS_KEY: [p.to_dict() for p in priors]}


def priors_from_header(header: Mapping[str, Any], path: str) -> tuple[SizePrior, ...]:
    """The size priors stored in an adapter file's header, one per structure in head order.

    Args:
        header: :func:`~fseft.adapt.adapter_io.read_adapter_header` of the file.
        path: The file (for error messages).

    Returns:
        The priors, in the adapter's structure order.

    Raises:
        CheckpointError: when the file holds no priors (not adapted with ``--transductive`` or a
            size prior) or they do not match its structures.
    """
    stored = header.get(PRIORS_KEY)
    if not stored:
        raise CheckpointError(
            f"{path}: the adapter holds no size prior; store one with 'fseft adapt --transductive QUERIES' "
            "or 'fseft adapt --tx-mode per-query'"
        )
    try:
        priors = {p.structure: p for p in (SizePrior.from_dict(d) for d in stored)}
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    structures = list(header.get("structures", []))
    missing = [s for s in structures if s not in priors]
    if missing:
        raise CheckpointError(f"{path}: the adapter has no size prior for {', '.join(missing)}")
    return tuple(priors[s] for s in structures)


__all__ = [
    "MIN_FOR_OUTLIERS",
    "PRIORS_KEY",
    "SizePrior",
    "body_mask",
    "largest_component",
    "measure",
    "priors_from_header",
    "priors_to_record",
    "robust_mean",
    "size_priors",
]
