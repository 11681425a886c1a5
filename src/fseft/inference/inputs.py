"""What to predict: image files, folders of images, DICOM series folders and dataset manifests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.io import image_suffix
from ..errors import DataError

_MANIFEST_FILES = ("dataset.json", "cases.csv")


@dataclass(frozen=True)
class PredictInput:
    """One volume to predict.

    Args:
        name: Case name; the outputs are named after it.
        path: Image file or DICOM series folder.
    """

    name: str
    path: Path


def find_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[PredictInput]:
    """Expand files, folders and manifests into the volumes to predict, checking they exist.

    Each path is one of: an image file (case name = file name without its image suffix); a folder
    with a ``dataset.json`` or ``cases.csv`` manifest; a folder of image files (one case each); a
    folder holding a DICOM series (one case named after the folder); a TotalSegmentator tree; or a
    manifest file (``.csv``, ``.json``; case names are the manifest's case ids).

    Args:
        paths: Inputs, in order.

    Returns:
        The inputs in order, without duplicated case names.

    Raises:
        DataError: A path is missing, a folder holds nothing to predict, a manifest is invalid, or two
            inputs share a case name.
    """
    found: list[PredictInput] = []
    for raw in paths:
        found.extend(_expand(Path(raw)))
    seen: dict[str, Path] = {}
    for item in found:
        if item.name in seen:
            raise DataError(f"{item.path}: case name {item.name!r} is also the name of {seen[item.name]}")
        seen[item.name] = item.path
    return found


def _expand(path: Path) -> list[PredictInput]:
    from ..data.manifests import load_manifest

    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_file():
        suffix = image_suffix(path)
        if suffix is not None:
            return [PredictInput(path.name[: -len(suffix)], path)]
        return [PredictInput(c.case_id, Path(c.image)) for c in load_manifest(path)]
    if any((path / name).is_file() for name in _MANIFEST_FILES):
        return [PredictInput(c.case_id, Path(c.image)) for c in load_manifest(path)]
    images = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and image_suffix(p) is not None
    )
    if images:
        return [PredictInput(p.name[: -len(image_suffix(p) or "")], p) for p in images]
    if _holds_dicom_series(path):
        return [PredictInput(path.name, path)]
    if any(p.is_dir() and (p / "ct.nii.gz").is_file() for p in path.iterdir()):
        return [PredictInput(c.case_id, Path(c.image)) for c in load_manifest(path)]
    raise DataError(f"{path}: folder holds no image files, DICOM series or dataset manifest")


def _holds_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
