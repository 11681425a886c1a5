"""Segmentation metrics: cross-checks against MONAI, hand-computed values, empty conventions."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage
from scipy.spatial.distance import cdist

from fseft.errors import DataError
from fseft.evaluation import (
    METRICS,
    StructureMetrics,
    evaluate_case,
    evaluate_masks,
    summarize,
    to_csv,
    to_json,
)
from fseft.evaluation.metrics import label_boxes, union_box


def blob(shape: tuple[int, int, int], seed: int, sigma: float = 2.5, level: float = 0.6) -> np.ndarray:
    """A random smooth blob: smoothed noise thresholded at a quantile."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return noise > np.quantile(noise, level)


def monai_reference(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> tuple[float, float, float]:
    """MONAI's Dice, HD95 and NSD on the full (uncropped) volume."""
    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    g = torch.from_numpy(gt.astype(np.float32))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dice = compute_dice(p, g, include_background=True)
        hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(p, g, [tol], include_background=True, spacing=list(spacing))
    return float(dice), float(hd95), float(nsd)


def brute_force(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """HD95 (max of the directed 95th percentiles) and NSD from all pairwise surface distances."""
    surfaces = [np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing) for m in (pred, gt)]
    d = cdist(surfaces[0], surfaces[1])
    d_pg, d_gp = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    nsd = ((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (d_pg.size + d_gp.size)
    return float(hd95), float(nsd)


def box_mask(shape, *slices: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices] = True
    return mask


def sphere(shape, center_mm, radius_mm: float, spacing) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64) * np.asarray(spacing)[:, None, None, None]
    return ((grid - np.asarray(center_mm)[:, None, None, None]) ** 2).sum(axis=0) <= radius_mm**2


@pytest.mark.parametrize(
    ("seed", "spacing", "tol"),
    [
        (0, (1.0, 1.0, 1.0), 1.0),
        (1, (0.8, 0.8, 2.5), 2.0),
        (2, (3.0, 1.5, 1.0), 3.5),
        (3, (2.0, 2.0, 2.0), 0.0),
    ],
)
def test_random_blobs_match_monai_on_full_volume(seed, spacing, tol):
    shape = (28, 24, 20)
    pred, gt = blob(shape, seed), blob(shape, seed + 100)
    row = evaluate_masks(pred, gt, spacing, tol)
    dice, hd95, nsd = monai_reference(pred, gt, spacing, tol)
    assert row.flag == ""
    assert row.dice == pytest.approx(dice, abs=1e-6)
    assert row.hd95_mm == pytest.approx(hd95, rel=1e-5)
    assert row.nsd == pytest.approx(nsd, abs=1e-6)
    assert (row.hd95_mm, row.nsd) == pytest.approx(brute_force(pred, gt, spacing, tol), rel=1e-5)


def test_small_blobs_in_large_volume_and_touching_the_border_match_monai():
    shape = (64, 60, 50)
    pred = np.zeros(shape, dtype=bool)
    gt = np.zeros(shape, dtype=bool)
    pred[:14, 20:34, 30:] = blob((14, 14, 20), 7, sigma=1.5, level=0.4)  # touches two faces of the volume
    gt[2:16, 21:35, 31:] = blob((14, 14, 19), 8, sigma=1.5, level=0.4)
    spacing = (0.7, 0.7, 3.0)
    row = evaluate_masks(pred, gt, spacing, 1.5)
    dice, hd95, nsd = monai_reference(pred, gt, spacing, 1.5)
    assert (row.dice, row.hd95_mm, row.nsd) == pytest.approx((dice, hd95, nsd), rel=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cubes_offset_two_voxels_along_a_3mm_axis(axis):
    """Cubes of 10 voxels shifted by 2 voxels along a 3 mm axis (other axes 10 mm).

    Per cube 488 surface voxels: 164 lie 6 mm from the other surface (the leading face and the
    interior of the trailing face), 36 lie 3 mm away (the ring next to the leading face), 288 touch.
    """
    spacing = [10.0, 10.0, 10.0]
    spacing[axis] = 3.0
    pred_slices = [slice(5, 15)] * 3
    gt_slices = [slice(5, 15)] * 3
    gt_slices[axis] = slice(7, 17)
    pred, gt = box_mask((30, 30, 30), *pred_slices), box_mask((30, 30, 30), *gt_slices)
    rows = {tol: evaluate_masks(pred, gt, spacing, tol) for tol in (2.0, 4.0, 7.0)}
    row = rows[2.0]
    assert row.dice == pytest.approx(0.8)
    assert row.hd95_mm == pytest.approx(6.0)
    assert row.vol_pred_ml == pytest.approx(1000 * 300 / 1000) == row.vol_gt_ml
    assert row.abs_vol_err_ml == 0 and row.rel_vol_err == 0 and row.flag == ""
    assert rows[2.0].nsd == pytest.approx(2 * 288 / 976)  # below the 3 mm offset
    assert rows[4.0].nsd == pytest.approx(2 * (288 + 36) / 976)  # between 3 and 6 mm
    assert rows[7.0].nsd == pytest.approx(1.0)  # above every distance


def test_cube_against_itself_is_perfect():
    cube = box_mask((12, 12, 12), slice(2, 8), slice(3, 9), slice(1, 10))
    row = evaluate_masks(cube, cube, (0.5, 1.0, 2.0), 0.0)
    assert (row.dice, row.hd95_mm, row.nsd, row.abs_vol_err_ml, row.rel_vol_err) == (1.0, 0.0, 1.0, 0.0, 0.0)
    assert row.vol_gt_ml == pytest.approx(6 * 6 * 9 * 1.0 / 1000)


def test_partially_overlapping_boxes_dice_and_volumes():
    pred = box_mask((20, 20, 20), slice(0, 10), slice(0, 10), slice(0, 10))  # 1000 voxels
    gt = box_mask((20, 20, 20), slice(5, 15), slice(0, 10), slice(0, 4))  # 400 voxels, 200 shared
    row = evaluate_masks(pred, gt, (1.0, 2.0, 0.5), case="c1", structure="liver")
    assert row.dice == pytest.approx(2 * 200 / 1400)
    assert row.vol_pred_ml == pytest.approx(1.0) and row.vol_gt_ml == pytest.approx(0.4)
    assert row.abs_vol_err_ml == pytest.approx(0.6)
    assert row.rel_vol_err == pytest.approx(1.5)
    assert (row.case, row.structure) == ("c1", "liver")


def test_spheres_with_anisotropic_spacing():
    spacing = (1.0, 1.0, 2.0)
    shape = (30, 30, 16)
    gt = sphere(shape, (15, 15, 15), 10.0, spacing)
    pred = sphere(shape, (15, 15, 19), 10.0, spacing)  # shifted 4 mm = 2 voxels along the 2 mm axis
    row = evaluate_masks(pred, gt, spacing, 2.0)
    assert row.vol_gt_ml == pytest.approx(4 / 3 * math.pi * 1000 / 1000, rel=0.05)
    assert (row.hd95_mm, row.nsd) == pytest.approx(brute_force(pred, gt, spacing, 2.0), rel=1e-5)
    assert 2.0 <= row.hd95_mm <= 4.0  # nothing is farther than the shift; the caps are at least one slice off
    assert row.dice == pytest.approx(2 * np.sum(pred & gt) / (pred.sum() + gt.sum()))


@pytest.mark.parametrize(
    ("pred_on", "gt_on", "flag", "score"),
    [(False, False, "both_empty", 1.0), (True, False, "fp_only", 0.0), (False, True, "missed", 0.0)],
)
def test_empty_conventions(pred_on, gt_on, flag, score):
    full = box_mask((8, 8, 8), slice(2, 4), slice(2, 4), slice(2, 4))  # 8 voxels of 8 mm3
    empty = np.zeros((8, 8, 8), dtype=bool)
    row = evaluate_masks(full if pred_on else empty, full if gt_on else empty, (2.0, 2.0, 2.0), 2.0)
    assert row.flag == flag
    assert row.dice == score and row.nsd == score
    assert math.isnan(row.hd95_mm)
    assert row.vol_pred_ml == pytest.approx(0.064 if pred_on else 0.0)
    assert row.vol_gt_ml == pytest.approx(0.064 if gt_on else 0.0)
    assert row.abs_vol_err_ml == pytest.approx(0.064 if pred_on != gt_on else 0.0)
    assert math.isnan(row.rel_vol_err) if not gt_on else row.rel_vol_err == -1.0


def test_evaluate_case_label_maps_with_different_value_sets():
    shape = (24, 24, 24)
    a, b = blob(shape, 1, level=0.8), blob(shape, 2, level=0.8)
    pred = np.zeros(shape, dtype=np.uint8)
    pred[a] = 1
    pred[b & ~a] = 2
    gt = np.zeros(shape, dtype=np.float32)  # float label maps with integral values are accepted
    gt[a] = 7
    gt[b & ~a] = 3
    rows = evaluate_case(
        pred, gt, (1.0, 2.0, 1.0), {2: "kidney", 1: "liver", 5: "spleen"}, 1.0,
        case="c", gt_structures={7: "liver", 3: "kidney", 9: "spleen"},
    )  # fmt: skip
    assert [r.structure for r in rows] == ["kidney", "liver", "spleen"]
    assert all(r.case == "c" for r in rows)
    assert rows[0].dice == 1.0 and rows[1].dice == 1.0 and rows[0].hd95_mm == 0.0
    assert rows[2].flag == "both_empty"
    shifted = np.roll(gt, 2, axis=1)
    rows = evaluate_case(pred, shifted, (1.0, 2.0, 1.0), {1: "liver"}, 1.0, gt_structures={7: "liver"})
    ref = evaluate_masks(pred == 1, shifted == 7, (1.0, 2.0, 1.0), 1.0)
    assert (rows[0].dice, rows[0].hd95_mm, rows[0].nsd) == (ref.dice, ref.hd95_mm, ref.nsd)
    assert rows[0].dice < 1.0


def test_evaluate_case_refuses_bad_inputs():
    good = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(
        DataError, match=r"prediction shape \(4, 4, 4\) differs from reference shape \(4, 4, 5\)"
    ):
        evaluate_case(good, np.zeros((4, 4, 5), np.uint8), (1, 1, 1), {1: "liver"})
    with pytest.raises(DataError, match="non-integer"):
        evaluate_case(good, np.full((4, 4, 4), 0.5, np.float32), (1, 1, 1), {1: "liver"})
    with pytest.raises(DataError, match="negative"):
        evaluate_case(good, np.full((4, 4, 4), -1, np.int16), (1, 1, 1), {1: "liver"})
    with pytest.raises(ValueError, match="gt_structures lacks"):
        evaluate_case(good, good, (1, 1, 1), {1: "liver"}, gt_structures={1: "spleen"})
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(good + 1, good + 1, (1, 0, 1), {1: "liver"})


def test_label_boxes_and_union_box():
    label = np.zeros((10, 10, 10), dtype=np.uint8)
    label[2:4, 3:5, 4:6] = 3
    label[9, 9, 9] = 1
    boxes = label_boxes(label)
    assert set(boxes) == {1, 3}
    assert boxes[3] == (slice(2, 4), slice(3, 5), slice(4, 6))
    assert union_box(boxes[3], boxes[1], label.shape) == (slice(1, 10), slice(2, 10), slice(3, 10))
    assert union_box(None, None, label.shape) is None


def test_large_volume_is_fast():
    shape = (512, 512, 300)
    pred = np.zeros(shape, dtype=np.uint8)
    gt = np.zeros(shape, dtype=np.uint8)
    pred[100:180, 200:290, 100:160] = 1
    gt[104:184, 200:290, 102:162] = 1
    pred[300:320, 300:330, 20:40] = 2
    start = time.perf_counter()
    rows = evaluate_case(pred, gt, (0.8, 0.8, 2.0), {1: "liver", 2: "spleen"})
    assert time.perf_counter() - start < 20.0  # generous: shared CI machines are slow
    crop = (slice(90, 200), slice(190, 300), slice(90, 170))
    dice, hd95, nsd = monai_reference(pred[crop] == 1, gt[crop] == 1, (0.8, 0.8, 2.0), 2.0)
    assert (rows[0].dice, rows[0].hd95_mm, rows[0].nsd) == pytest.approx((dice, hd95, nsd), rel=1e-5)
    assert rows[1].flag == "fp_only"


def rows_for_summary() -> list[StructureMetrics]:
    nan = math.nan
    return [
        StructureMetrics("a", "liver", 0.8, 3.0, 0.9, 10.0, 12.0, 2.0, -1 / 6, ""),
        StructureMetrics("b", "liver", 0.6, 5.0, 0.7, 11.0, 10.0, 1.0, 0.1, ""),
        StructureMetrics("c", "liver", 0.0, nan, 0.0, 0.0, 5.0, 5.0, -1.0, "missed"),
        StructureMetrics("a", "spleen", 1.0, nan, 1.0, 0.0, 0.0, 0.0, nan, "both_empty"),
    ]


def test_summarize_skips_and_counts_nan():
    summary = {(s.structure, s.metric): s for s in summarize(rows_for_summary())}
    assert len(summary) == 2 * len(METRICS)
    dice = summary[("liver", "dice")]
    assert (dice.n, dice.n_nan) == (3, 0)
    assert dice.mean == pytest.approx(1.4 / 3) and dice.median == pytest.approx(0.6)
    assert dice.std == pytest.approx(np.std([0.8, 0.6, 0.0], ddof=1))
    hd = summary[("liver", "hd95_mm")]
    assert (hd.n, hd.n_nan, hd.mean, hd.median) == (2, 1, 4.0, 4.0)
    spleen_hd = summary[("spleen", "hd95_mm")]
    assert (spleen_hd.n, spleen_hd.n_nan) == (0, 1) and math.isnan(spleen_hd.mean)
    assert math.isnan(summary[("spleen", "dice")].std)  # one value: no sample std


def test_csv_and_json_serialisation():
    rows = rows_for_summary()
    text = to_csv(rows, ["case", "structure", "dice", "hd95_mm", "flag"])
    lines = text.splitlines()
    assert lines[0] == "case,structure,dice,hd95_mm,flag"
    assert lines[3] == "c,liver,0.0,nan,missed"
    doc = to_json(rows, summarize(rows), tolerance_mm=2.0)
    assert doc["tolerance_mm"] == 2.0
    assert doc["cases"][2]["hd95_mm"] is None and doc["cases"][2]["flag"] == "missed"
    assert {"structure", "metric", "mean", "std", "median", "n", "n_nan"} == set(doc["summary"][0])
