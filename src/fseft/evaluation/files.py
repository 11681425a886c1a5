"""Evaluate label-map files: pairing predictions with references, label names, grid checks.

Predictions are never resampled: a prediction must lie on its reference's grid (same shape, same
affine within :data:`GRID_TOLERANCE_MM`), otherwise a :class:`~fseft.errors.GeometryError` names
both files. References come either as label-map files (paired with predictions by case name, the
file name without its image suffix) or from a dataset manifest, whose labels are read onto each
case's CT grid with :func:`fseft.data.io.read_label`.

Either side may instead be a DICOM-SEG or RT Structure Set (``.dcm``, as written by ``fseft predict
--output-format``, or exported from a planning system): it is placed on the other side's grid (the
label map, or the manifest case's CT) by :func:`fseft.data.dicom_objects.read_structure_masks`,
which refuses objects that do not lie on it. Its structure names come from the file. A structure a
DICOM prediction lacks is an empty prediction; one a DICOM reference lacks is not evaluated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..anatomy import canonical, get_template
from ..data.cases import Case
from ..data.dicom_objects import DICOM_SUFFIX, is_dicom_file, read_structure_masks, structure_names
from ..data.image import Image
from ..data.io import image_suffix, read_image, read_label
from ..errors import ConfigError, DataError, GeometryError
from .metrics import StructureMetrics, as_label_array, evaluate_case, evaluate_masks, label_boxes, union_box

logger = logging.getLogger(__name__)

#: File beside predictions (written by ``fseft predict``) mapping label value -> structure name.
LABELS_JSON = "labels.json"
#: Largest affine difference (mm) still read as the same grid (float32 header round-off is far below).
GRID_TOLERANCE_MM = 1e-2


@dataclass(frozen=True)
class EvalPair:
    """A prediction file and the reference label-map file of the same case."""

    case: str
    pred: Path
    gt: Path


def case_name(path: str | os.PathLike[str]) -> str:
    """The case name of an image or DICOM file: its name without the suffix (``.nii.gz``, ``.dcm``...)."""
    path = Path(path)
    suffix = DICOM_SUFFIX if is_dicom_file(path) else image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def label_files(folder: Path) -> dict[str, Path]:
    """Case name -> file for the image and DICOM (``.dcm``) files directly inside ``folder`` (hidden files skipped).

    Raises:
        DataError: If two files share a case name (``a.nii`` and ``a.nii.gz``).
    """
    files: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file():
            continue
        if image_suffix(file) is None and not is_dicom_file(file):
            continue
        name = case_name(file)
        if name in files:
            raise DataError(f"{folder}: two files for case {name!r}: {files[name].name}, {file.name}")
        files[name] = file
    return files


def pair_files(pred: Path, gt: Path) -> tuple[list[EvalPair], list[str], list[str]]:
    """Pair prediction and reference files by case name.

    Args:
        pred: A prediction file or a folder of them.
        gt: A reference label-map file or a folder of them.

    Returns:
        ``(pairs, cases without a reference, cases without a prediction)``, sorted by case name.

    Raises:
        DataError: If an input does not exist or a folder holds two files of one case.
    """
    preds, gts = _files_of(pred), _files_of(gt)
    if pred.is_file() and gt.is_file():  # two explicit files are one case whatever their names
        return [EvalPair(case_name(pred), pred, gt)], [], []
    pairs = [EvalPair(name, preds[name], gts[name]) for name in sorted(preds) if name in gts]
    return pairs, sorted(set(preds) - set(gts)), sorted(set(gts) - set(preds))


def _files_of(path: Path) -> dict[str, Path]:
    if not path.exists():
        raise DataError(f"{path}: not found")
    return label_files(path) if path.is_dir() else {case_name(path): path}


def is_dicom_side(path: Path) -> bool:
    """Whether an input is a DICOM-SEG / RT Structure Set file, or a folder holding only such files."""
    if path.is_file():
        return is_dicom_file(path)
    files = label_files(path) if path.is_dir() else {}
    return bool(files) and all(is_dicom_file(f) for f in files.values())


def dicom_labels(path: Path) -> dict[int, str]:
    """The structures the DICOM file(s) of an input name, as a value -> name mapping (values are only keys).

    Raises:
        DataError: A file is unreadable, neither a DICOM-SEG nor an RT Structure Set, or repeats a name.
    """
    files = [path] if path.is_file() else list(label_files(path).values())
    names = dict.fromkeys(n for file in files for n in structure_names(file))
    return {i + 1: name for i, name in enumerate(names)}


def read_labels_json(path: str | os.PathLike[str]) -> dict[int, str]:
    """Read a ``{"value": "structure"}`` JSON file (as written by ``fseft predict``).

    Structure names are resolved with :func:`fseft.anatomy.canonical`; names it does not know (a
    new organ) are kept as written.

    Raises:
        ConfigError: If the file is missing, not JSON, or not a value -> name mapping.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from e
    return parse_labels(data, str(path))


def parse_labels(data: object, where: str) -> dict[int, str]:
    """Validate a label value -> structure name mapping (keys may be numeric strings).

    Raises:
        ConfigError: Naming ``where`` when it is not such a mapping or repeats a structure.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a non-empty JSON object mapping label value -> structure")
    labels: dict[int, str] = {}
    for key, name in data.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: key {key!r} is not an integer label value") from None
        if value <= 0 or not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: entry {key!r}: {name!r} needs a value >= 1 and a structure name")
        labels[value] = structure_name(name)
    names = list(labels.values())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: structures named by more than one value: {', '.join(repeated)}")
    return labels


def structure_name(name: str) -> str:
    """The canonical name of a known structure, or ``name`` itself for one the anatomy lacks."""
    try:
        return canonical(name)
    except ConfigError:
        return name


def select_structures(available: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    """The structures to evaluate: ``requested`` (resolved to canonical names) or all available.

    Raises:
        ConfigError: Naming the unknown structures and the known ones, or when none is available.
    """
    if not available:
        raise ConfigError("prediction and reference share no structure name; nothing to evaluate")
    if requested is None:
        return list(available)
    chosen = [structure_name(n) for n in requested]
    unknown = [n for n, c in zip(requested, chosen, strict=True) if c not in available]
    if unknown:
        raise ConfigError(
            f"unknown structure(s) {', '.join(unknown)}; known structures: {', '.join(available)}"
        )
    return list(dict.fromkeys(chosen))


def read_labelmap(path: Path, labels: Mapping[int, str]) -> Image:
    """Read a label map and check that every value in it has a structure name.

    Raises:
        DataError: Naming the file when it is unreadable, holds invalid values, or values that
            ``labels`` does not name.
    """
    image = read_image(path, dtype=None)
    try:
        array = as_label_array(image.array)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    unknown = sorted(set(label_boxes(array)) - set(labels))
    if unknown:
        raise DataError(f"{path}: label values {unknown} have no structure name (known: {sorted(labels)})")
    return image.with_array(array)


def check_same_grid(pred: Image, gt: Image) -> None:
    """Refuse a prediction that does not lie on its reference's grid.

    Raises:
        GeometryError: Naming both files (and both shapes when they differ).
    """
    if pred.shape != gt.shape:
        raise GeometryError(
            f"{pred.name} has shape {pred.shape} but {gt.name} has shape {gt.shape}; "
            "predictions are not resampled"
        )
    if not pred.same_grid(gt, atol=GRID_TOLERANCE_MM):
        diff = float(np.abs(pred.affine - gt.affine).max())
        raise GeometryError(
            f"{pred.name} and {gt.name} are not on the same grid (affines differ by up to {diff:.3g} mm); "
            "predictions are not resampled"
        )


def evaluate_pair(
    pair: EvalPair,
    pred_labels: Mapping[int, str],
    gt_labels: Mapping[int, str],
    structures: Sequence[str],
    tolerance_mm: float = 2.0,
) -> list[StructureMetrics]:
    """Metrics of one prediction file against its reference label-map file.

    Args:
        pair: The two files.
        pred_labels: Label value -> structure name in the prediction.
        gt_labels: Label value -> structure name in the reference.
        structures: Names to evaluate; each must be named by both mappings.
        tolerance_mm: NSD tolerance in mm.

    Returns:
        One row per structure.

    Raises:
        ConfigError: Both files are DICOM objects (neither gives a grid).
        DataError: A file is unreadable or holds unnamed values.
        GeometryError: The files are not on the same grid.
    """
    if is_dicom_file(pair.pred) or is_dicom_file(pair.gt):
        return _evaluate_dicom_pair(pair, pred_labels, gt_labels, structures, tolerance_mm)
    pred = read_labelmap(pair.pred, pred_labels)
    gt = read_labelmap(pair.gt, gt_labels)
    check_same_grid(pred, gt)
    chosen = set(structures)
    return evaluate_case(
        pred.array,
        gt.array,
        pred.spacing,
        {v: n for v, n in pred_labels.items() if n in chosen},
        tolerance_mm,
        case=pair.case,
        gt_structures={v: n for v, n in gt_labels.items() if n in chosen},
    )


def _evaluate_dicom_pair(
    pair: EvalPair,
    pred_labels: Mapping[int, str],
    gt_labels: Mapping[int, str],
    structures: Sequence[str],
    tolerance_mm: float,
) -> list[StructureMetrics]:
    """A pair where one side is a DICOM-SEG / RT Structure Set, placed on the other side's label-map grid."""
    if is_dicom_file(pair.pred) and is_dicom_file(pair.gt):
        raise ConfigError(
            f"{pair.pred} and {pair.gt} are both DICOM objects; give one side as a label map (or GT as a "
            "manifest) whose grid the other is placed on"
        )
    if is_dicom_file(pair.pred):
        grid = read_labelmap(pair.gt, gt_labels)
        value_of = {n: v for v, n in gt_labels.items()}
        gt_masks = {n: grid.array == value_of[n] for n in structures}
        pred_masks = read_structure_masks(pair.pred, grid, structures)
    else:
        grid = read_labelmap(pair.pred, pred_labels)
        value_of = {n: v for v, n in pred_labels.items()}
        pred_masks = {n: grid.array == value_of[n] for n in structures}
        gt_masks = read_structure_masks(pair.gt, grid, structures)
    return evaluate_mask_maps(pred_masks, gt_masks, structures, grid.spacing, tolerance_mm, pair.case)


def evaluate_mask_maps(
    pred: Mapping[str, np.ndarray],
    gt: Mapping[str, np.ndarray],
    structures: Sequence[str],
    spacing: Sequence[float],
    tolerance_mm: float,
    case: str,
) -> list[StructureMetrics]:
    """One row per structure the reference holds; a structure the prediction lacks is an empty mask."""
    rows = []
    for name in structures:
        if name not in gt:
            continue
        mask = pred[name] if name in pred else np.zeros_like(gt[name])
        rows.append(evaluate_masks(mask, gt[name], spacing, tolerance_mm, case=case, structure=name))
    return rows


def evaluate_files(
    pairs: Sequence[EvalPair],
    pred_labels: Mapping[int, str],
    gt_labels: Mapping[int, str],
    structures: Sequence[str] | None = None,
    tolerance_mm: float = 2.0,
) -> list[StructureMetrics]:
    """Metrics of every pair of label-map files.

    Args:
        pairs: Prediction / reference files (see :func:`pair_files`).
        pred_labels: Label value -> structure name in the predictions.
        gt_labels: Label value -> structure name in the references.
        structures: Names to evaluate (default: every structure both mappings name).
        tolerance_mm: NSD tolerance in mm.

    Returns:
        One row per case and structure.

    Raises:
        ConfigError: Unknown structure names.
        DataError: A file is unreadable or holds unnamed values.
        GeometryError: A prediction is not on its reference's grid.
    """
    gt_names = set(gt_labels.values())
    chosen = select_structures([n for n in pred_labels.values() if n in gt_names], structures)
    return [
        row for pair in pairs for row in evaluate_pair(pair, pred_labels, gt_labels, chosen, tolerance_mm)
    ]


def manifest_structures(case: Case) -> tuple[str, ...]:
    """The structures a manifest case annotates (without opening any file)."""
    if case.structures is not None:
        return case.structures
    names = (n for source in case.labels for n in get_template(source.template).structures)
    return tuple(dict.fromkeys(names))


def evaluate_manifest_case(
    case: Case,
    pred_path: Path,
    pred_labels: Mapping[int, str],
    structures: Sequence[str],
    tolerance_mm: float = 2.0,
) -> list[StructureMetrics]:
    """Metrics of one prediction against a manifest case's labels, on the case's CT grid.

    Only structures the case annotates are evaluated (partial labels are never read as background).

    Args:
        case: The manifest case (its image fixes the grid; its label sources give the reference).
        pred_path: The prediction label map (or DICOM-SEG / RT Structure Set) for the case.
        pred_labels: Label value -> structure name in the prediction.
        structures: Names to evaluate.
        tolerance_mm: NSD tolerance in mm.

    Returns:
        One row per evaluated structure.

    Raises:
        DataError: A file is unreadable or holds unnamed values.
        GeometryError: The prediction is not on the CT's grid.
    """
    ct = read_image(case.image)
    annotated = set(manifest_structures(case))
    wanted = [n for n in structures if n in annotated]
    masks: dict[str, np.ndarray] = {}
    for source in case.labels:
        for name, mask in read_label(source, ct).items():
            masks.setdefault(name, mask)  # an earlier source wins
    if is_dicom_file(pred_path):
        references = {n: masks[n] for n in wanted if n in masks}
        pred_masks = read_structure_masks(pred_path, ct, wanted)
        return evaluate_mask_maps(pred_masks, references, wanted, ct.spacing, tolerance_mm, case.case_id)
    pred = read_labelmap(pred_path, pred_labels)
    check_same_grid(pred, ct)
    value_of = {n: v for v, n in pred_labels.items()}
    pred_boxes = label_boxes(pred.array)
    rows = []
    for name in wanted:
        if name not in masks or name not in value_of:
            continue
        gt_mask, value = masks[name], value_of[name]
        box = union_box(pred_boxes.get(value), label_boxes(gt_mask).get(1), pred.shape)
        if box is None:
            crop_pred, crop_gt = np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool)
        else:
            crop_pred, crop_gt = pred.array[box] == value, gt_mask[box]
        rows.append(
            evaluate_masks(crop_pred, crop_gt, pred.spacing, tolerance_mm, case=case.case_id, structure=name)
        )
    return rows
