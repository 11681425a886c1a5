"""DICOM image series: slice headers, their geometry, and the checks that keep it honest.

A series is a stack of single-frame slices. It is accepted only when it describes one regular grid:
every slice has the same orientation, pixel spacing, size and frame of reference, and the slice
positions are evenly spaced along the slice normal (a missing slice, a duplicated one or a changing
spacing would otherwise be read as a wrong geometry without a word). :func:`check_slices` is used by
:func:`fseft.data.io.read_image` on every DICOM series; :func:`read_series` adds what DICOM outputs
need: exactly one series in the folder, and the identifiers (study, series, instance, frame of
reference) the outputs reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import DataError

#: LPS+ (DICOM patient coordinates) to RAS+ (ours) and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Largest disagreement (mm) between slices' orientation vectors, spacings or step lengths.
TOLERANCE_MM = 1e-2
#: Largest relative deviation of one slice step from the mean step (a missing slice doubles it).
STEP_TOLERANCE = 0.05
#: Identifiers a DICOM output copies or references.
REQUIRED_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
)
_GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")


@dataclass(frozen=True)
class DicomSeries:
    """One validated DICOM image series.

    Args:
        folder: The folder it was read from.
        files: Slice files in grid order: file ``k`` is slice ``k`` of the volume :func:`read_image` returns.
        datasets: Their headers (without pixel data), same order.
        affine: Voxel index ``[column, row, slice]`` -> RAS+ mm, as :func:`read_image` returns it.
    """

    folder: Path
    files: tuple[Path, ...]
    datasets: tuple[Dataset, ...]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(columns, rows, slices)``."""
        first = self.datasets[0]
        return int(first.Columns), int(first.Rows), len(self.datasets)


def read_headers(files: Sequence[str | os.PathLike[str]]) -> list[Dataset]:
    """Read the headers (no pixel data) of DICOM files.

    Raises:
        DataError: Naming a file that is not readable DICOM.
    """
    headers = []
    for file in files:
        try:
            headers.append(pydicom.dcmread(file, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise DataError(f"{file}: not a readable DICOM file ({' '.join(str(e).split())})") from e
    return headers


def check_slices(datasets: Sequence[Dataset], where: str | os.PathLike[str]) -> tuple[list[int], np.ndarray]:
    """Check that slices form one regular grid and find their order along the slice normal.

    Args:
        datasets: Slice headers, in any order.
        where: Folder named in error messages.

    Returns:
        ``(order, affine)``: indices of ``datasets`` by increasing position along the normal, and the
        grid's voxel ``[column, row, slice]`` -> RAS+ affine.

    Raises:
        DataError: A slice lacks geometry, slices disagree on orientation, spacing, size or frame of
            reference, two slices share a position, slices do not stack along the normal, or the
            spacing between slices is not constant (a missing slice).
    """
    if not datasets:
        raise DataError(f"{where}: no DICOM slices")
    for ds in datasets:
        missing = [k for k in _GEOMETRY if ds.get(k) in (None, "")]
        if missing:
            raise DataError(
                f"{where}: {_file(ds)} lacks {', '.join(missing)}; not an image slice with geometry"
            )
    first = datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    for ds in datasets[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4):
            raise DataError(
                f"{where}: slices have different orientations ({_file(first)}, {_file(ds)}); mixed series?"
            )
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), spacing, atol=1e-4):
            raise DataError(f"{where}: slices have different pixel spacings ({_file(first)}, {_file(ds)})")
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise DataError(f"{where}: slices have different sizes ({_file(first)}, {_file(ds)})")
    frames = sorted({str(ds.get("FrameOfReferenceUID", "")) for ds in datasets})
    if len(frames) > 1:
        raise DataError(f"{where}: slices belong to {len(frames)} frames of reference; mixed series?")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise DataError(f"{where}: Image Orientation (Patient) is not two orthogonal unit vectors")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    heights = positions @ normal
    order = [int(i) for i in np.argsort(heights, kind="stable")]
    positions, heights = positions[order], heights[order]
    step = 1.0
    if len(order) > 1:
        steps = np.diff(heights)
        if steps.min() < TOLERANCE_MM:
            k = int(steps.argmin())
            raise DataError(
                f"{where}: {_file(datasets[order[k]])} and {_file(datasets[order[k + 1]])} lie at the same "
                "position; duplicated slice or mixed series?"
            )
        offsets = np.diff(positions, axis=0) - np.outer(steps, normal)
        if np.abs(offsets).max() > TOLERANCE_MM:
            raise DataError(f"{where}: slice positions do not stack along the slice normal (gantry tilt?)")
        step = float(np.median(steps))
        bad = np.flatnonzero(np.abs(steps - step) > max(STEP_TOLERANCE * step, TOLERANCE_MM))
        if bad.size:
            k = int(bad[0])
            ratio = steps[k] / step
            missing = ratio > 1.5 and abs(ratio - round(ratio)) <= STEP_TOLERANCE * round(ratio)
            raise DataError(
                f"{where}: slices are {step:g} mm apart but {_file(datasets[order[k]])} and "
                f"{_file(datasets[order[k + 1]])} are {steps[k]:.4g} mm apart; "
                + ("a slice is missing" if missing else "inconsistent slice spacing")
            )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # columns advance along the row direction, PixelSpacing[1] apart
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return order, LPS_TO_RAS @ lps


def read_series(folder: str | os.PathLike[str]) -> DicomSeries:
    """Read and check the one DICOM image series in ``folder``, with the identifiers outputs reference.

    Files that are not DICOM (a README) are skipped; hidden files and sub-folders are ignored.

    Raises:
        DataError: The folder holds no DICOM, several series (mixed series), a slice without its
            study / series / instance / frame-of-reference identifiers, a repeated instance, or an
            irregular grid (see :func:`check_slices`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a DICOM series folder")
    files, datasets = [], []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
        except InvalidDicomError:
            continue
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{file}: not a readable DICOM file ({' '.join(str(e).split())})") from e
        files.append(file)
    if not datasets:
        raise DataError(f"{folder}: folder holds no DICOM files")
    series: dict[str, int] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", ""))
        series[uid] = series.get(uid, 0) + 1
    if len(series) > 1:
        found = ", ".join(f"{uid or '(no UID)'}: {n} file(s)" for uid, n in series.items())
        raise DataError(f"{folder}: holds {len(series)} DICOM series ({found}); put one series per folder")
    for ds, file in zip(datasets, files, strict=True):
        missing = [k for k in REQUIRED_UIDS if not str(ds.get(k, "")).strip()]
        if missing:
            raise DataError(
                f"{file}: empty or missing {', '.join(missing)}; a DICOM output must reference its source by these"
            )
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != len(uids):
        raise DataError(f"{folder}: two files hold the same SOP Instance UID")
    order, affine = check_slices(datasets, folder)
    return DicomSeries(folder, tuple(files[i] for i in order), tuple(datasets[i] for i in order), affine)


def _file(ds: Dataset) -> str:
    name = getattr(ds, "filename", None)
    return Path(name).name if isinstance(name, str | os.PathLike) else "a slice"
