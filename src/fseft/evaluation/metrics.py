"""Per-structure segmentation metrics on label maps with voxel spacing.

For every structure of a case: Dice, the 95th-percentile symmetric Hausdorff distance (mm),
the normalised surface Dice (NSD) at a tolerance in mm, the predicted and reference volumes (ml),
the absolute volume error ``|V_pred - V_gt|`` (ml) and the signed relative volume error
``(V_pred - V_gt) / V_gt``.

Surface metrics use MONAI's implementations (:func:`monai.metrics.compute_hausdorff_distance`
with ``percentile=95`` and :func:`monai.metrics.compute_surface_dice`): surfaces are the
voxels removed by one binary erosion, distances are Euclidean in mm (voxel spacing applied),
HD95 is the larger of the two directed 95th percentiles, and NSD is the fraction of both
surfaces' voxels lying within the tolerance of the other surface. Each structure is evaluated
on the bounding box of ``pred | gt`` plus a one-voxel margin only, so large volumes stay fast.

Empty structures follow one convention, recorded in :attr:`StructureMetrics.flag`:

==================================  =====  =====  =====  ==============
case                                Dice   NSD    HD95   flag
==================================  =====  =====  =====  ==============
both empty                          1      1      NaN    ``both_empty``
reference empty, prediction not     0      0      NaN    ``fp_only``
prediction empty, reference not     0      0      NaN    ``missed``
both non-empty                      value  value  value  ``""``
==================================  =====  =====  =====  ==============

The relative volume error is NaN whenever the reference is empty. Aggregations
(:mod:`fseft.evaluation.aggregate`) skip NaN values and report how many there were.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import DataError

#: A bounding box: one slice per array axis.
Box = tuple[slice, slice, slice]

BOTH_EMPTY = "both_empty"
FP_ONLY = "fp_only"
MISSED = "missed"


@dataclass(frozen=True)
class StructureMetrics:
    """The metrics of one structure in one case (one row of the per-case CSV).

    Args:
        case: Case name.
        structure: Structure name.
        dice: Dice overlap in [0, 1].
        hd95_mm: 95th-percentile symmetric Hausdorff distance in mm (NaN if either side is empty).
        nsd: Normalised surface Dice at the evaluation tolerance, in [0, 1].
        vol_pred_ml: Predicted volume in ml.
        vol_gt_ml: Reference volume in ml.
        abs_vol_err_ml: ``|vol_pred_ml - vol_gt_ml|``.
        rel_vol_err: ``(vol_pred_ml - vol_gt_ml) / vol_gt_ml`` (NaN if the reference is empty).
        flag: ``""``, ``"both_empty"``, ``"fp_only"`` or ``"missed"`` (see the module docstring).
    """

    case: str
    structure: str
    dice: float
    hd95_mm: float
    nsd: float
    vol_pred_ml: float
    vol_gt_ml: float
    abs_vol_err_ml: float
    rel_vol_err: float
    flag: str


def label_boxes(label: np.ndarray) -> dict[int, Box]:
    """The bounding box of every non-zero value present in an integer label map.

    Args:
        label: Label map with non-negative integer values (any integer or integral float dtype).

    Returns:
        ``{value: box}`` for each value > 0 occurring in ``label``.

    Raises:
        DataError: If the map holds negative, non-integral or non-finite values.
    """
    label = as_label_array(label)
    return {value + 1: box for value, box in enumerate(ndimage.find_objects(label)) if box is not None}


def as_label_array(label: np.ndarray) -> np.ndarray:
    """``label`` as a non-negative integer array (integral floats are converted).

    Raises:
        DataError: If it holds negative, non-integral or non-finite values.
    """
    if label.dtype == bool:
        return label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.rint(label)):
            raise DataError("label map holds non-integer values")
        label = label.astype(np.int64 if label.max(initial=0) > np.iinfo(np.int32).max else np.int32)
    if label.size and label.min() < 0:
        raise DataError(f"label map holds negative values (min {label.min()})")
    return label


def evaluate_masks(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    *,
    case: str = "",
    structure: str = "",
) -> StructureMetrics:
    """Metrics of one structure given as two boolean masks on the same grid.

    Args:
        pred: Predicted mask (``X, Y, Z``), boolean or 0/1.
        gt: Reference mask, same shape.
        spacing: Voxel size in mm along each array axis.
        tolerance_mm: NSD tolerance in mm.
        case: Case name stored in the row.
        structure: Structure name stored in the row.

    Returns:
        The structure's :class:`StructureMetrics`.

    Raises:
        DataError: If the shapes differ.
        ValueError: If ``spacing`` is not three positive numbers.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    _check_shapes(pred.shape, gt.shape)
    box = union_box(label_boxes(pred).get(1), label_boxes(gt).get(1), pred.shape)
    if box is None:
        return _row(case, structure, None, None, spacing, tolerance_mm)
    return _row(case, structure, pred[box], gt[box], spacing, tolerance_mm)


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    structures: Mapping[int, str],
    tolerance_mm: float = 2.0,
    *,
    case: str = "",
    gt_structures: Mapping[int, str] | None = None,
) -> list[StructureMetrics]:
    """Metrics of every requested structure of one case given as two label maps.

    Args:
        pred: Predicted label map (``X, Y, Z``, non-negative integers, 0 = background).
        gt: Reference label map on the same grid.
        spacing: Voxel size in mm along each array axis.
        structures: Label value -> structure name in ``pred`` (and in ``gt`` unless
            ``gt_structures`` is given); one row per entry, in this order.
        tolerance_mm: NSD tolerance in mm.
        case: Case name stored in the rows.
        gt_structures: Label value -> structure name in ``gt`` when the reference uses other
            values than the prediction; it must name every structure of ``structures``.

    Returns:
        One :class:`StructureMetrics` per structure.

    Raises:
        DataError: If the shapes differ or a map holds invalid values.
        ValueError: If ``gt_structures`` lacks a structure of ``structures``, a mapping names one
            structure twice, or ``spacing`` / ``tolerance_mm`` is invalid.
    """
    _check_shapes(pred.shape, gt.shape)
    if tolerance_mm < 0 or not math.isfinite(tolerance_mm):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    pred, gt = as_label_array(pred), as_label_array(gt)
    gt_value = _name_to_value(gt_structures if gt_structures is not None else structures)
    missing = [name for name in structures.values() if name not in gt_value]
    if missing:
        raise ValueError(f"gt_structures lacks {missing}")
    pred_boxes, gt_boxes = label_boxes(pred), label_boxes(gt)
    rows = []
    for p_value, name in structures.items():
        g_value = gt_value[name]
        box = union_box(pred_boxes.get(p_value), gt_boxes.get(g_value), pred.shape)
        if box is None:
            rows.append(_row(case, name, None, None, spacing, tolerance_mm))
        else:
            rows.append(_row(case, name, pred[box] == p_value, gt[box] == g_value, spacing, tolerance_mm))
    return rows


def _name_to_value(structures: Mapping[int, str]) -> dict[str, int]:
    names = list(structures.values())
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"structure names used by more than one label value: {duplicated}")
    return {name: int(value) for value, name in structures.items()}


def _check_shapes(pred_shape: tuple[int, ...], gt_shape: tuple[int, ...]) -> None:
    if len(pred_shape) != 3 or pred_shape != gt_shape:
        raise DataError(
            f"prediction shape {tuple(pred_shape)} differs from reference shape {tuple(gt_shape)}"
        )


def union_box(a: Box | None, b: Box | None, shape: tuple[int, ...], margin: int = 1) -> Box | None:
    """The bounding box of two boxes (either may be ``None``) plus ``margin`` voxels, clipped to ``shape``.

    Returns:
        The box, or ``None`` when both are ``None``.
    """
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return None
    return tuple(  # type: ignore[return-value]
        slice(
            max(min(bx[d].start for bx in boxes) - margin, 0),
            min(max(bx[d].stop for bx in boxes) + margin, n),
        )
        for d, n in enumerate(shape)
    )


def _row(
    case: str,
    structure: str,
    pred: np.ndarray | None,
    gt: np.ndarray | None,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> StructureMetrics:
    """Metrics from (cropped) boolean masks; ``None`` stands for an empty mask."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred = int(pred.sum()) if pred is not None else 0
    n_gt = int(gt.sum()) if gt is not None else 0
    vol_pred, vol_gt = n_pred * voxel_ml, n_gt * voxel_ml
    rel = (vol_pred - vol_gt) / vol_gt if n_gt else math.nan
    volumes = dict(
        vol_pred_ml=vol_pred, vol_gt_ml=vol_gt, abs_vol_err_ml=abs(vol_pred - vol_gt), rel_vol_err=rel
    )
    if n_pred == 0 or n_gt == 0:
        flag = BOTH_EMPTY if n_pred == n_gt else (MISSED if n_pred == 0 else FP_ONLY)
        score = 1.0 if flag == BOTH_EMPTY else 0.0
        return StructureMetrics(case, structure, score, math.nan, score, **volumes, flag=flag)
    assert pred is not None and gt is not None
    dice = 2.0 * int(np.count_nonzero(pred & gt)) / (n_pred + n_gt)
    hd95, nsd = _surface_metrics(pred, gt, spacing, tolerance_mm)
    return StructureMetrics(case, structure, dice, hd95, nsd, **volumes, flag="")


def _surface_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> tuple[float, float]:
    """HD95 (mm) and NSD of two non-empty boolean masks via MONAI."""
    import torch  # imported here: torch and MONAI take seconds to import, and ``fseft --help`` needs neither
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    y_pred = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(gt))[None, None]
    with warnings.catch_warnings():
        # MONAI warns about its own deprecated internal arguments; nothing the caller can act on.
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(y_pred, y, [tolerance_mm], include_background=True, spacing=spacing)
    return float(hd95[0, 0]), float(nsd[0, 0])
