"""Reading and writing volumes with their geometry; reading labels onto an image's grid.

Every reader returns an :class:`~fseft.data.image.Image` in nibabel's convention (array ``[X, Y, Z]``,
affine voxel -> RAS+ mm). NIfTI goes through nibabel (with the qform/sform nibabel chooses); NRRD,
MHA/MHD and DICOM series go through SimpleITK, whose LPS geometry and ``[z, y, x]`` arrays are
converted here, once. Problems with an input file become a one-line :class:`~fseft.errors.DataError`
``"PATH: problem"``.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import DTypeLike

from ..anatomy import DatasetTemplate, get_template
from ..config import PreprocessConfig
from ..errors import ConfigError, DataError, GeometryError
from ..io_utils import atomic_path
from .cases import Case, LabelSource
from .dicom_series import check_slices, read_headers
from .geometry import align_label
from .image import Image
from .validate import validate_ct

logger = logging.getLogger(__name__)

#: Voxels above this value (HU) are inside the body (used to split lumped paired organs).
BODY_HU = -500.0

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

# SimpleITK (ITK) geometry is LPS+; ours is RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """The supported image suffix ``path`` ends with (``".nii.gz"``, ``".mha"``...), if any."""
    name = Path(path).name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def read_image(path: str | os.PathLike[str], *, dtype: DTypeLike | None = np.float32) -> Image:
    """Read a 3D volume with its geometry.

    Args:
        path: A NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage
            (``.mha``, ``.mhd``) file, or a folder holding a DICOM series (when it holds several
            series the one with the most slices is read; slices are ordered by position; rescale
            slope/intercept are applied, giving HU; a missing slice or an irregular grid is refused).
        dtype: Voxel type of the returned array; ``None`` keeps the stored type (after NIfTI
            scaling). NaN and inf values, and singular affines (a NIfTI voxel size of 0 included,
            which nibabel would replace by 1 mm), are returned as they are: :mod:`fseft.data.validate`
            refuses them.

    Returns:
        The image, with ``path`` set.

    Raises:
        DataError: The file is missing, empty, truncated, not an image, or not 3D (a 4D volume
            whose trailing axes are singletons is squeezed to 3D).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    else:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        suffix = image_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        else:
            array, affine = _read_sitk_file(path)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(array.shape)}")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Image(np.ascontiguousarray(array), affine, path)


def write_image(image: Image, path: str | os.PathLike[str], dtype: DTypeLike | None = None) -> None:
    """Write ``image`` as NIfTI, atomically, with its affine as both sform and qform.

    Args:
        image: The volume to write.
        path: Output file ending in ``.nii`` or ``.nii.gz``.
        dtype: Voxel type on disk; ``None`` keeps the array's (booleans become uint8).

    Raises:
        ConfigError: ``path`` is not a NIfTI file name.
    """
    if image_suffix(path) not in NIFTI_SUFFIXES:
        raise ConfigError(f"{path}: output images are written as NIfTI; use a .nii or .nii.gz name")
    array = image.array
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    elif array.dtype == bool:
        array = array.astype(np.uint8)
    nifti = nib.Nifti1Image(array, image.affine)
    nifti.set_sform(image.affine, code=1)
    nifti.set_qform(image.affine, code=1)
    nifti.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(nifti, tmp)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        nifti = nib.load(path)
        array = np.asanyarray(nifti.dataobj)
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt file ({_one_line(e)})") from e
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable NIfTI image ({_one_line(e)})") from e
    affine = np.array(nifti.affine, dtype=np.float64)
    if int(nifti.header["sform_code"]) == 0:
        # nibabel replaces a zero pixdim by 1 mm while loading: keep the zero (read from the header as
        # stored), so the unknown voxel size is refused instead of guessed
        with nib.openers.ImageOpener(path) as f:
            stored = type(nifti.header).from_fileobj(f, check=False)
        affine[:3, :3][:, np.asarray(stored["pixdim"][1:4]) == 0] = 0.0
    return array, affine


def _read_sitk_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: not a readable image ({_sitk_reason(e)})") from e
    return _from_sitk(image, path)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise DataError(f"{folder}: folder holds no DICOM series")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files[sid]))
    if len(series_ids) > 1:
        logger.info(
            "%s: %d DICOM series; reading %r (%d slices), the one with the most slices",
            folder,
            len(series_ids),
            chosen,
            len(files[chosen]),
        )
    _, expected = check_slices(read_headers(files[chosen]), folder)  # a missing slice, mixed geometry
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])  # ordered by slice position by GDCM
    try:
        image = reader.Execute()  # applies rescale slope / intercept (HU)
    except RuntimeError as e:
        raise DataError(f"{folder}: unreadable DICOM series ({_sitk_reason(e)})") from e
    array, affine = _from_sitk(image, folder)
    if not np.allclose(affine, expected, atol=1e-3):
        raise GeometryError(f"{folder}: the series' slice headers and the volume read disagree on its geometry")
    return array, affine


def _from_sitk(image: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS, array ``[z, y, x]``) -> array ``[x, y, z]`` and RAS affine."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel; expected a scalar CT"
        )
    dim = image.GetDimension()
    if dim < 3:
        raise DataError(f"{path}: expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    array = sitk.GetArrayFromImage(image).transpose(tuple(range(dim))[::-1])
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return array, affine


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _sitk_reason(error: RuntimeError) -> str:
    """The informative last line of a (multi-line) SimpleITK exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason.replace("sitk::ERROR:", "").strip()


def _read_label_image(path: Path) -> Image:
    """Read a label map / mask as integers, refusing non-integer values."""
    image = read_image(path, dtype=None)
    array = image.array
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise DataError(f"{path}: label holds non-integer values")
    elif array.dtype.kind not in "iub":
        raise DataError(f"{path}: label has unsupported voxel type {array.dtype}")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low >= 0 and high <= np.iinfo(np.uint8).max:
        target: type[np.integer] = np.uint8
    elif low >= 0 and high <= np.iinfo(np.uint16).max:
        target = np.uint16
    else:
        target = np.int32
    return image.with_array(array.astype(target, copy=False))


def read_label(
    source: LabelSource, reference: Image, *, structures: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """Read one label source as boolean structure masks on the reference grid.

    Args:
        source: A label map file, or a folder of per-structure mask files, with the name of the
            :mod:`fseft.anatomy` template that maps its values / file names to canonical structures.
        reference: The image the masks must lie on; its grid is the output grid, and its voxels
            above ``BODY_HU`` form the body mask used by the template's split rules.
        structures: Only build masks for these canonical structures (a 117-class label map then
            costs a few masks, not 117); ``None`` builds every structure of the template.

    Returns:
        Canonical structure name -> boolean mask shaped like ``reference``. A label map yields every
        (requested) structure of its template, absent ones as empty masks; a mask folder yields the
        (requested) structures whose mask files it holds. Lumped paired structures are split by the
        template's rules.

    Raises:
        DataError: The label is unreadable, holds values the template does not know, or the mask
            folder holds none of the template's files.
        GeometryError: The label grid does not cover the reference's physical space.
        ConfigError: Unknown template name.
    """
    template = get_template(source.template)
    wanted = template if structures is None else _restrict(template, set(structures))
    path = Path(source.path)
    if template.layout == "mask-files":
        return _read_mask_folder(path, template, wanted, reference)
    if path.is_dir():
        raise DataError(f"{path}: template {template.name!r} expects a label-map file, got a folder")
    if wanted is None:
        return {}
    aligned = align_label(_read_label_image(path), reference)
    array = aligned.array
    if wanted is not template:
        unknown = ~np.isin(array, np.asarray([0, *template.labels]))
        if unknown.any():
            values = ", ".join(str(v) for v in np.unique(array[unknown])[:10].tolist())
            raise DataError(f"{path}: label value(s) {values} not defined by template {template.name!r}")
        array = np.where(np.isin(array, np.asarray(list(wanted.labels))), array, 0)
    body = reference.array > BODY_HU if wanted.split_rules else None
    return wanted.to_structure_map(array, reference.affine, body=body, source=path)


def _restrict(template: DatasetTemplate, wanted: set[str]) -> DatasetTemplate | None:
    """The part of ``template`` that holds ``wanted`` structures (itself if all), ``None`` if none."""

    def needed(name: str) -> bool:
        return name in wanted or any(part in wanted for part in template.split_rules.get(name, ()))

    labels = {value: name for value, name in template.labels.items() if needed(name)}
    files = {stem: name for stem, name in template.mask_files.items() if needed(name)}
    if len(labels) == len(template.labels) and len(files) == len(template.mask_files):
        return template
    if not labels and not files:
        return None
    kept = set(labels.values()) | set(files.values())
    return DatasetTemplate(
        name=template.name,
        layout=template.layout,
        labels=labels,
        mask_files=files,
        split_rules={name: parts for name, parts in template.split_rules.items() if name in kept},
        path=template.path,
    )


def _read_mask_folder(
    path: Path, template: DatasetTemplate, wanted: DatasetTemplate | None, reference: Image
) -> dict[str, np.ndarray]:
    if not path.is_dir():
        raise DataError(f"{path}: template {template.name!r} expects a folder of mask files")
    by_stem: dict[str, Path] = {}
    for file in sorted(path.iterdir()):
        suffix = image_suffix(file)
        if suffix is not None and file.is_file():
            by_stem[file.name[: -len(suffix)]] = file
    if not set(by_stem) & set(template.mask_files):
        raise DataError(f"{path}: holds none of the mask files of template {template.name!r}")
    if wanted is None:
        return {}
    masks: dict[str, np.ndarray] = {}
    for stem, structure in wanted.mask_files.items():
        file = by_stem.get(stem)
        if file is not None:
            masks[structure] = align_label(_read_label_image(file), reference).array != 0
    logger.debug("%s: read %d of %d mask files", path, len(masks), len(template.mask_files))
    body = reference.array > BODY_HU if set(masks) & set(wanted.split_rules) else None
    return wanted.split_lumped(masks, reference.affine, body)


@dataclass(frozen=True)
class CaseVolume:
    """A case loaded into memory on its image grid.

    Args:
        image: The CT (float32 HU) with its geometry.
        label: uint8 index map on the image grid: 0 background, ``i + 1`` = ``structures[i]``.
        annotated: bool ``[len(structures)]``; False means the case says nothing about that
            structure (its voxels are *unknown*, not background).
    """

    image: Image
    label: np.ndarray
    annotated: np.ndarray


def load_case(
    case: Case, structures: Sequence[str], *, preprocess: PreprocessConfig | None = None
) -> CaseVolume:
    """Read a case's image and labels as one index map over ``structures``.

    The image goes through :func:`fseft.data.validate.validate_ct` as soon as it is read, before its
    labels.

    Label sources are applied in order, and within a source structures in the order of
    ``structures``; a voxel already claimed keeps its value. A structure is annotated when the case
    declares it (``case.structures``, or every structure of its templates when that is ``None``)
    and one of its label sources provides it. Only the masks of ``structures`` are built.

    Args:
        case: The case to load.
        structures: Canonical structure names; index ``i`` becomes label value ``i + 1``.
        preprocess: The model's preprocessing, for the resampled-size bound of the validation.

    Returns:
        The loaded :class:`CaseVolume`.

    Raises:
        ConfigError: ``structures`` has duplicates or more than 255 names.
        DataError: An image or label cannot be read, the image fails the validation, or ``case.structures`` names one of
            ``structures`` that its label sources do not provide.
        GeometryError: A label does not cover the image's physical space.
    """
    structures = list(structures)
    if len(set(structures)) != len(structures):
        raise ConfigError(f"duplicate structure names in {structures}")
    if len(structures) > np.iinfo(np.uint8).max:
        raise ConfigError(f"at most 255 structures fit a uint8 label map, got {len(structures)}")
    image = validate_ct(read_image(case.image), preprocess=preprocess)
    label = np.zeros(image.shape, dtype=np.uint8)
    provided: set[str] = set()
    declared: set[str] = set(case.structures) if case.structures is not None else set()
    for source in case.labels:
        masks = read_label(source, image, structures=structures)
        provided.update(masks)
        if case.structures is None:
            declared.update(get_template(source.template).structures)
        for index, name in enumerate(structures):
            if name in masks:
                label[masks[name] & (label == 0)] = index + 1
    if case.labels and case.structures is not None:
        unprovided = sorted((declared & set(structures)) - provided)
        if unprovided:
            raise DataError(
                f"{case.labels[0].path}: case {case.case_id!r} declares {unprovided} "
                "but its label sources do not provide them"
            )
    annotated = np.array([name in declared and name in provided for name in structures], dtype=bool)
    return CaseVolume(image=image, label=label, annotated=annotated)
