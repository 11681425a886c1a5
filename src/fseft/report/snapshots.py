"""One query case seen by one benchmark cell, kept small: the axial and coronal slices through the
reference's centroid (CT, reference and prediction), so the report can draw every method's
prediction at every ``k`` without the data, the model or the adapters.

A snapshot is a compressed ``.npz`` of a few 2D planes (tens of KiB); the benchmark writes one per
cell for the task's first query case (``OUT/snapshots/<cell id>.npz``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.image import Image
from ..errors import DataError
from ..io_utils import atomic_path
from .figures import CT_WINDOW, _aspect, _ras_spacing, _to_ras, _view

#: The views a snapshot keeps.
SNAPSHOT_VIEWS = ("axial", "coronal")


@dataclass(frozen=True)
class QuerySnapshot:
    """Slices of one query case in display order (radiological convention, superior up).

    Args:
        case: Query case id.
        structures: Target structures; mask value ``i + 1`` is ``structures[i]``.
        ct: View -> CT plane in HU, clipped to the soft-tissue window.
        reference: View -> reference index-map plane.
        prediction: View -> predicted index-map plane.
        aspect: View -> pixel aspect ratio (height / width in mm).
    """

    case: str
    structures: tuple[str, ...]
    ct: Mapping[str, np.ndarray]
    reference: Mapping[str, np.ndarray]
    prediction: Mapping[str, np.ndarray]
    aspect: Mapping[str, float]


def take_snapshot(
    case: str,
    image: Image,
    reference: Mapping[str, np.ndarray],
    prediction: np.ndarray,
    structures: Sequence[str],
) -> QuerySnapshot:
    """Cut the axial and coronal slices through the centroid of the task's reference.

    Args:
        case: Query case id.
        image: The CT; masks lie on its grid.
        reference: Structure -> reference mask.
        prediction: Predicted index map (``i + 1`` = ``structures[i]``).
        structures: Target structures.

    Returns:
        The snapshot (the prediction's centroid when the reference is empty).
    """
    ref = np.zeros(image.shape, np.uint8)
    for i, name in enumerate(structures):
        ref[np.asarray(reference[name], bool)] = i + 1
    ras = {key: _to_ras(v, image.affine) for key, v in (("ct", image.array), ("ref", ref), ("pred", prediction))}
    source = ras["ref"] if ras["ref"].any() else ras["pred"]
    centre = np.rint(np.argwhere(source).mean(axis=0)).astype(int) if source.any() else np.asarray(ref.shape) // 2
    spacing = _ras_spacing(image)
    planes = {key: {v: _view(vol, v, centre) for v in SNAPSHOT_VIEWS} for key, vol in ras.items()}
    return QuerySnapshot(
        case=case, structures=tuple(structures),
        ct={v: np.clip(p, *CT_WINDOW).astype(np.float16) for v, p in planes["ct"].items()},
        reference={v: p.astype(np.uint8) for v, p in planes["ref"].items()},
        prediction={v: p.astype(np.uint8) for v, p in planes["pred"].items()},
        aspect={v: _aspect(v, spacing) for v in SNAPSHOT_VIEWS},
    )  # fmt: skip


def save_snapshot(snapshot: QuerySnapshot, path: str | os.PathLike[str]) -> Path:
    """Write ``snapshot`` as a compressed ``.npz``, atomically; returns the path."""
    arrays: dict[str, np.ndarray] = {
        "case": np.array(snapshot.case),
        "structures": np.array(snapshot.structures),
        "aspect": np.array([snapshot.aspect[v] for v in SNAPSHOT_VIEWS]),
    }
    for v in SNAPSHOT_VIEWS:
        arrays[f"ct_{v}"] = snapshot.ct[v]
        arrays[f"reference_{v}"] = snapshot.reference[v]
        arrays[f"prediction_{v}"] = snapshot.prediction[v]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_snapshot(path: str | os.PathLike[str]) -> QuerySnapshot:
    """Read a snapshot written by :func:`save_snapshot`.

    Raises:
        DataError: naming the file when it is not a snapshot.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return QuerySnapshot(
                case=str(data["case"]), structures=tuple(str(s) for s in data["structures"]),
                ct={v: data[f"ct_{v}"].astype(np.float32) for v in SNAPSHOT_VIEWS},
                reference={v: data[f"reference_{v}"] for v in SNAPSHOT_VIEWS},
                prediction={v: data[f"prediction_{v}"] for v in SNAPSHOT_VIEWS},
                aspect=dict(zip(SNAPSHOT_VIEWS, (float(a) for a in data["aspect"]), strict=True)),
            )  # fmt: skip
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a readable query snapshot ({e})") from None


__all__ = ["SNAPSHOT_VIEWS", "QuerySnapshot", "load_snapshot", "save_snapshot", "take_snapshot"]
