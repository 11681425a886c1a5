"""Reading DICOM-SEG and RT Structure Set files as structure masks on a given grid.

Neither object is resampled: a DICOM-SEG's frames must lie on the grid's slices (same in-plane
axes up to flips and swaps, integer offsets), and an RT Structure Set's contours must each lie in one
slice plane of the grid; they are then placed (SEG) or rasterised by pixel centre with the even-odd
rule (RTSTRUCT, :func:`fseft.data.contours.fill_polygons`) exactly there. Anything else is a
:class:`~fseft.errors.GeometryError` naming both sides. Structure names are the segment labels /
ROI names, resolved to canonical names where the anatomy knows them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..anatomy import canonical
from ..errors import ConfigError, DataError, GeometryError
from .contours import fill_polygons
from .dicom_series import LPS_TO_RAS
from .image import Image

logger = logging.getLogger(__name__)

DICOM_SUFFIX = ".dcm"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
KINDS = {SEG_SOP_CLASS: "dicom-seg", RTSTRUCT_SOP_CLASS: "rtstruct"}
CONTOUR_DATA = 0x30060050
#: Largest distance (in voxels) of a frame or contour from the grid's slice or voxel lattice.
LATTICE_TOLERANCE = 0.05


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named like a DICOM file (``.dcm``)."""
    return Path(path).name.lower().endswith(DICOM_SUFFIX)


def structure_names(path: str | os.PathLike[str]) -> list[str]:
    """The structures a DICOM-SEG (segment labels) or RT Structure Set (ROI names) holds, canonical where known.

    Raises:
        DataError: The file is unreadable, neither kind, or names one structure twice.
    """
    ds = _read(path, stop_before_pixels=True)
    kind = KINDS.get(str(ds.get("SOPClassUID", "")))
    if kind == "dicom-seg":
        names = [_name(s.SegmentLabel) for s in ds.SegmentSequence]
    elif kind == "rtstruct":
        names = [_name(r.ROIName) for r in ds.get("StructureSetROISequence", [])]
    else:
        raise DataError(f"{path}: neither a DICOM-SEG nor an RT Structure Set")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: names {', '.join(repeated)} more than once")
    return names


def read_structure_masks(
    path: str | os.PathLike[str], grid: Image, structures: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """Read a DICOM-SEG or RT Structure Set as boolean masks on ``grid``.

    Args:
        path: The DICOM file.
        grid: The grid (shape and affine) the masks are placed on; its name appears in errors.
        structures: Only these structures (a 100-segment file then costs a few masks); ``None``: all.

    Returns:
        Structure name -> boolean mask shaped like ``grid`` (every wanted segment / ROI, empty ones too).

    Raises:
        DataError: The file is unreadable, neither kind, or names one structure twice.
        GeometryError: A frame or contour does not lie on the grid.
    """
    names = structure_names(path)
    ds = _read(path, stop_before_pixels=False)
    to_index = np.linalg.inv(grid.affine) @ LPS_TO_RAS  # LPS (DICOM patient) -> grid voxel index
    items = ds.SegmentSequence if str(ds.SOPClassUID) == SEG_SOP_CLASS else ds.StructureSetROISequence
    numbers = [int(i.SegmentNumber if "SegmentNumber" in i else i.ROINumber) for i in items]
    by_number = {
        number: name
        for number, name in zip(numbers, names, strict=True)
        if structures is None or name in structures
    }
    if str(ds.SOPClassUID) == SEG_SOP_CLASS:
        masks = _segmentation_masks(ds, Path(path), grid, to_index, set(by_number))
        return {name: masks[number] for number, name in by_number.items()}
    polygons = _roi_polygons(ds, Path(path), grid, to_index, set(by_number))
    masks = {}
    for number, name in by_number.items():
        mask = np.zeros(grid.shape, dtype=bool)
        for (axis, index), rings in polygons.get(number, {}).items():
            plane = [a for a in range(3) if a != axis]
            section = [slice(None)] * 3
            section[axis] = index
            mask[tuple(section)] = fill_polygons(rings, (grid.shape[plane[0]], grid.shape[plane[1]]))
        masks[name] = mask
    return masks


def _read(path: str | os.PathLike[str], *, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable DICOM file ({' '.join(str(e).split())})") from e


def _name(label: str) -> str:
    try:
        return canonical(str(label))
    except ConfigError:
        return str(label)


def _segmentation_masks(
    ds: Dataset, path: Path, grid: Image, to_index: np.ndarray, wanted: set[int]
) -> dict[int, np.ndarray]:
    """Segment number -> mask on ``grid`` for the ``wanted`` segments, placing every frame at its grid position."""
    pixels = ds.pixel_array
    frames = pixels.reshape(-1, *pixels.shape[-2:])
    threshold = (
        0.5 * float(ds.get("MaximumFractionalValue", 1)) if ds.SegmentationType == "FRACTIONAL" else 0.5
    )
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    masks = {number: np.zeros(grid.shape, dtype=bool) for number in wanted}
    for frame, groups in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in masks:
            continue
        position = np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        orientation = _functional(groups, shared, "PlaneOrientationSequence", path).ImageOrientationPatient
        spacing = _functional(groups, shared, "PixelMeasuresSequence", path).PixelSpacing
        rows, columns = np.nonzero(frame > threshold)
        if rows.size == 0:
            continue
        base, along_column, along_row = _frame_axes(position, orientation, spacing, to_index, path, grid)
        index = np.rint(base + np.outer(columns, along_column) + np.outer(rows, along_row)).astype(np.int64)
        if np.any(index < 0) or np.any(index >= np.asarray(grid.shape)):
            raise GeometryError(f"{path}: segment {number} reaches outside the grid of {grid.name}")
        masks[number][index[:, 0], index[:, 1], index[:, 2]] = True
    return masks


def _functional(groups: Dataset, shared: Dataset, keyword: str, path: Path) -> Dataset:
    item = groups.get(keyword) or shared.get(keyword)
    if not item:
        raise DataError(f"{path}: a frame lacks {keyword}")
    return item[0]


def _frame_axes(
    position: np.ndarray, orientation: list, spacing: list, to_index: np.ndarray, path: Path, grid: Image
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid index of a frame's first pixel and the grid steps of one column / one row, checked to lie on the lattice."""
    iop = np.asarray(orientation, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in spacing)
    rot = to_index[:3, :3]
    base = rot @ position + to_index[:3, 3]
    along_column = rot @ (iop[:3] * column_spacing)  # next column: along the row direction
    along_row = rot @ (iop[3:] * row_spacing)
    for step in (along_column, along_row):
        if not np.allclose(np.sort(np.abs(step)), (0.0, 0.0, 1.0), atol=1e-3):
            raise GeometryError(
                f"{path}: its frames are not on the voxel lattice of {grid.name}; DICOM objects are not resampled"
            )
    if np.abs(base - np.rint(base)).max() > LATTICE_TOLERANCE:
        raise GeometryError(
            f"{path}: its frames are not on the voxel lattice of {grid.name}; DICOM objects are not resampled"
        )
    return np.rint(base), along_column, along_row


def _roi_polygons(
    ds: Dataset, path: Path, grid: Image, to_index: np.ndarray, wanted: set[int]
) -> dict[int, dict[tuple[int, int], list[np.ndarray]]]:
    """Closed contours of the ``wanted`` ROIs: number -> (slice axis, slice index) -> ``(column, row)`` rings."""
    out: dict[int, dict[tuple[int, int], list[np.ndarray]]] = {}
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if number not in wanted:
            continue
        planes = out.setdefault(number, {})
        for contour in roi.get("ContourSequence", []):
            if contour.get("ContourGeometricType") != "CLOSED_PLANAR":
                logger.debug(
                    "%s: ROI %d: %s contour skipped (no area)",
                    path,
                    number,
                    contour.get("ContourGeometricType"),
                )
                continue
            points = _contour_points(contour)
            index = points @ to_index[:3, :3].T + to_index[:3, 3]
            axis = _plane_axis(index, grid.shape)
            if axis is None:
                raise GeometryError(
                    f"{path}: a contour of ROI {number} does not lie on a slice of {grid.name}; "
                    "DICOM objects are not resampled"
                )
            plane = [a for a in range(3) if a != axis]
            rings = planes.setdefault((axis, int(np.rint(index[0, axis]))), [])
            rings.append(index[:, [plane[1], plane[0]]])  # (column, row) of the [plane[0], plane[1]] section
    return out


def _contour_points(contour: Dataset) -> np.ndarray:
    """Contour Data as ``(N, 3)`` floats, parsed from the encoded text when pydicom has not (its DS checks are slow)."""
    element = contour.get_item(CONTOUR_DATA)
    value = element.value if element is not None else None
    if isinstance(value, bytes):
        return np.array(value.decode("ascii").split("\\"), dtype=np.float64).reshape(-1, 3)
    return np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)


def _plane_axis(index: np.ndarray, shape: tuple[int, int, int]) -> int | None:
    """The grid axis along which all contour points share one integer slice index inside the grid."""
    for axis in (2, 0, 1):
        values = index[:, axis]
        k = np.rint(values.mean())
        if np.abs(values - k).max() <= LATTICE_TOLERANCE and 0 <= k < shape[axis]:
            return axis
    return None
