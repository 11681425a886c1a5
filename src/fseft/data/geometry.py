"""Checking that a label grid and an image grid describe the same physical space, and aligning them.

Labels are often stored on a grid that differs from their image's (axes flipped or permuted by a
converter, another resolution) while covering the same patient region. Such labels are resampled
onto the image grid with nearest neighbour *in world space*, so label values are preserved exactly.
Grids that cover different regions are refused: silently cropping or padding them would move the
anatomy.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from ..errors import GeometryError
from .image import Image
from .validate import affine_problem

logger = logging.getLogger(__name__)

#: Two affines closer than this (mm, element-wise) describe the same grid.
DEFAULT_TOL_MM = 1e-3


def world_bbox(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS, mm) bounding box of the space the voxels cover, outer voxel faces included.

    Args:
        image: Any image.

    Returns:
        ``(low, high)``: the element-wise minimum and maximum of the grid's eight corners, each taken
        half a voxel outside the outermost voxel centres.
    """
    shape = np.asarray(image.shape, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    index = corners * shape - 0.5
    world = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def check_same_grid(a: Image, b: Image, *, tol_mm: float = DEFAULT_TOL_MM) -> bool:
    """True when ``a`` and ``b`` have the same shape and affines equal within ``tol_mm``.

    Args:
        a: First image.
        b: Second image.
        tol_mm: Element-wise tolerance on the affines.

    Returns:
        Whether voxel ``[i, j, k]`` of one is voxel ``[i, j, k]`` of the other.
    """
    return a.same_grid(b, atol=tol_mm)


def same_space(a: Image, b: Image, *, tol_mm: float = DEFAULT_TOL_MM) -> bool:
    """True when both grids cover the same world box, within one voxel of the coarser grid.

    Args:
        a: First image.
        b: Second image.
        tol_mm: Extra tolerance (mm) added to the one-voxel allowance.

    Returns:
        Whether the world bounding boxes of both grids agree.
    """
    allowance = max(max(a.spacing), max(b.spacing)) + tol_mm
    low_a, high_a = world_bbox(a)
    low_b, high_b = world_bbox(b)
    return bool(np.all(np.abs(low_a - low_b) <= allowance) and np.all(np.abs(high_a - high_b) <= allowance))


def describe_mismatch(a: Image, b: Image) -> str:
    """One line comparing the shapes, spacings, origins and world extents of two grids."""

    def fmt(values: np.ndarray | tuple[float, ...]) -> str:
        return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"

    low_a, high_a = world_bbox(a)
    low_b, high_b = world_bbox(b)
    return (
        f"shapes {a.shape} vs {b.shape}, spacings {fmt(a.spacing)} vs {fmt(b.spacing)}, "
        f"origins {fmt(a.origin)} vs {fmt(b.origin)}, "
        f"extents {fmt(low_a)}-{fmt(high_a)} vs {fmt(low_b)}-{fmt(high_b)} mm"
    )


def align_label(label: Image, reference: Image, *, tol_mm: float = DEFAULT_TOL_MM) -> Image:
    """Put ``label`` on the grid of ``reference``.

    An identical grid passes unchanged. A grid that covers the same physical space (flipped or
    permuted axes, another resolution, a sub-voxel shift) is resampled with nearest neighbour in
    world space: each reference voxel centre is mapped to world coordinates with the reference
    affine and back into the label grid with the label's inverse affine.

    Args:
        label: Label image (integer or boolean values; they are preserved exactly).
        reference: Image whose grid the label must share.
        tol_mm: Tolerance on the affines for "identical", and the extra allowance for "same space".

    Returns:
        ``label`` itself when the grids are identical, otherwise a new image on the reference grid
        (same dtype as ``label.array``, ``path`` kept from ``label``).

    Raises:
        GeometryError: The label's affine is singular, or the grids do not cover the same physical
            space; the message names both files and compares shapes, spacings, origins and extents.
    """
    if check_same_grid(label, reference, tol_mm=tol_mm):
        return label
    singular = affine_problem(label.affine)
    if singular is not None:
        raise GeometryError(f"{label.name}: {singular}")
    if not same_space(label, reference, tol_mm=tol_mm):
        raise GeometryError(
            f"{label.name}: label grid does not cover the same space as image {reference.name}: "
            f"{describe_mismatch(label, reference)}"
        )
    logger.info(
        "%s: resampling label onto the grid of %s (%s -> %s)",
        label.name,
        reference.name,
        label.axcodes,
        reference.axcodes,
    )
    # voxel index in the reference -> world -> voxel index in the label
    ref_to_label = np.linalg.inv(label.affine) @ reference.affine
    source = label.array.astype(np.uint8) if label.array.dtype == bool else label.array
    resampled = ndimage.affine_transform(
        source,
        ref_to_label[:3, :3],
        offset=ref_to_label[:3, 3],
        output_shape=reference.shape,
        order=0,
        mode="nearest",
    )
    if label.array.dtype == bool:
        resampled = resampled.astype(bool)
    return Image(resampled, reference.affine.copy(), label.path)
