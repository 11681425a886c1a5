"""Geometry checks and world-space label alignment (fseft.data.geometry)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fseft.data.geometry import align_label, check_same_grid, same_space, world_bbox
from fseft.data.image import Image
from fseft.errors import GeometryError


def _affine(matrix: list[list[float]], origin: list[float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def labelled() -> tuple[Image, np.ndarray]:
    """A 6x5x4 label with distinct values per voxel on an anisotropic RAS grid."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 120, size=(6, 5, 4)).astype(np.uint8)
    affine = _affine([[1.5, 0, 0], [0, 0.8, 0], [0, 0, 2.5]], [-10.0, 20.0, 30.0])
    return Image(array, affine, Path("ref.nii.gz")), array


def test_world_bbox_includes_outer_voxel_faces() -> None:
    image = Image(np.zeros((4, 2, 3)), _affine([[-2, 0, 0], [0, 1, 0], [0, 0, 3]], [10, 0, 0]))
    low, high = world_bbox(image)
    # x: centres 10, 8, 6, 4 -> faces 11 .. 3; y: 0, 1 -> -0.5 .. 1.5; z: 0, 3, 6 -> -1.5 .. 7.5
    np.testing.assert_allclose(low, [3, -0.5, -1.5])
    np.testing.assert_allclose(high, [11, 1.5, 7.5])


def test_identical_grid_passes_unchanged(labelled: tuple[Image, np.ndarray]) -> None:
    reference, array = labelled
    label = Image(array.copy(), reference.affine + 1e-5, Path("label.nii.gz"))
    assert check_same_grid(label, reference)
    assert align_label(label, reference) is label


def test_flipped_axis_is_resampled_in_world_space(labelled: tuple[Image, np.ndarray]) -> None:
    reference, array = labelled
    # The same space stored with y running the other way (the DICOM slab's situation).
    flip = reference.affine.copy()
    flip[:3, 1] *= -1
    flip[:3, 3] = reference.affine[:3, :3] @ [0, array.shape[1] - 1, 0] + reference.affine[:3, 3]
    label = Image(array[:, ::-1, :].copy(), flip, Path("label.nii.gz"))
    assert not check_same_grid(label, reference) and same_space(label, reference)
    aligned = align_label(label, reference)
    assert aligned.same_grid(reference)
    np.testing.assert_array_equal(aligned.array, array)
    assert aligned.array.dtype == np.uint8


def test_permuted_and_flipped_axes(labelled: tuple[Image, np.ndarray]) -> None:
    reference, array = labelled
    # Store as [z, x, y] with x reversed: voxel (k, i', j) is reference voxel (X-1-i', j, k).
    stored = np.transpose(array[::-1, :, :], (2, 0, 1)).copy()
    index_to_ref = np.zeros((4, 4))
    index_to_ref[2, 0] = 1  # k
    index_to_ref[0, 1] = -1  # i = X-1-i'
    index_to_ref[0, 3] = array.shape[0] - 1
    index_to_ref[1, 2] = 1  # j
    index_to_ref[3, 3] = 1
    label = Image(stored, reference.affine @ index_to_ref, Path("label.mha"))
    aligned = align_label(label, reference)
    np.testing.assert_array_equal(aligned.array, array)


def test_coarser_label_is_upsampled_by_nearest_neighbour() -> None:
    fine = Image(np.zeros((8, 6, 4), np.float32), _affine(np.diag([1.0, 1.0, 1.0]).tolist(), [0, 0, 0]))
    coarse_values = np.arange(4 * 3 * 2, dtype=np.uint16).reshape(4, 3, 2) + 300
    # Voxel (0,0,0) of the coarse grid spans fine voxels 0..1 on each axis: centre at 0.5 mm.
    coarse = Image(coarse_values, _affine(np.diag([2.0, 2.0, 2.0]).tolist(), [0.5, 0.5, 0.5]), Path("c.nrrd"))
    assert same_space(coarse, fine)
    aligned = align_label(coarse, fine)
    expected = coarse_values.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(aligned.array, expected)
    assert aligned.array.dtype == np.uint16


def test_boolean_masks_stay_boolean(labelled: tuple[Image, np.ndarray]) -> None:
    reference, array = labelled
    flip = reference.affine.copy()
    flip[:3, 2] *= -1
    flip[:3, 3] = reference.affine[:3, :3] @ [0, 0, array.shape[2] - 1] + reference.affine[:3, 3]
    mask = array[:, :, ::-1] > 60
    aligned = align_label(Image(mask.copy(), flip), reference)
    assert aligned.array.dtype == bool
    np.testing.assert_array_equal(aligned.array, array > 60)


@pytest.mark.parametrize(
    ("shape", "shift_mm"),
    [((6, 5, 4), [30.0, 0.0, 0.0]), ((6, 5, 9), [0.0, 0.0, 0.0])],
    ids=["shifted", "longer"],
)
def test_different_space_is_refused_naming_both_files(
    labelled: tuple[Image, np.ndarray], shape: tuple[int, int, int], shift_mm: list[float]
) -> None:
    reference, _ = labelled
    affine = reference.affine.copy()
    affine[:3, 3] += shift_mm
    label = Image(np.zeros(shape, np.uint8), affine, Path("/data/lbl.nii.gz"))
    with pytest.raises(GeometryError) as info:
        align_label(label, reference)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("/data/lbl.nii.gz:") and "ref.nii.gz" in message
    for word in ("shapes", "spacings", "origins", "extents"):
        assert word in message
    assert str(shape) in message


def test_sub_voxel_extent_difference_is_accepted(labelled: tuple[Image, np.ndarray]) -> None:
    reference, array = labelled
    affine = reference.affine.copy()
    affine[:3, 3] += [0.3, -0.2, 0.5]  # less than half a voxel: the same voxels are chosen
    aligned = align_label(Image(array.copy(), affine), reference)
    np.testing.assert_array_equal(aligned.array, array)
