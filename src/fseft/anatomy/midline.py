"""Split a lumped left+right mask into the patient's right and left halves in world coordinates.

Voxel ``[i, j, k]`` lies at world ``affine @ [i, j, k, 1]`` (RAS+ mm, nibabel's convention), where
``+x`` points to the patient's RIGHT (the liver has larger world x than the spleen; DICOM's LPS+ has
the opposite sign). Working in world x makes the split correct for any affine: flipped, permuted or
oblique voxel axes.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError, GeometryError


def check_affine(affine: np.ndarray) -> np.ndarray:
    """Return ``affine`` as a finite float 4x4 voxel-to-world matrix.

    Raises:
        GeometryError: when it is not a finite 4x4 matrix with an invertible 3x3 part.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError(
            f"affine must be a finite, invertible 4x4 voxel-to-world matrix, got shape {a.shape}"
        )
    return a


def mean_world_x(mask: np.ndarray, affine: np.ndarray) -> float:
    """Mean world x (mm) of the voxels of ``mask``, without listing the voxels.

    World x is linear in the voxel index, so its mean is the world x of the mean index; the mean
    index comes from the mask's projections onto each axis.

    Raises:
        DataError: when ``mask`` is empty.
    """
    m = np.asarray(mask, dtype=bool)
    count = int(m.sum())
    if count == 0:
        raise DataError("cannot place the body midline: the mask is empty")
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = m.sum(axis=other, dtype=np.int64)
        centre.append(float(np.dot(np.arange(m.shape[axis], dtype=np.float64), profile)) / count)
    return float(affine[0, :3] @ np.asarray(centre) + affine[0, 3])


def split_right_left(
    lumped: np.ndarray, affine: np.ndarray, body: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a lumped mask into the patient's right and left parts at the body midline.

    Args:
        lumped: Boolean ``[X, Y, Z]`` mask holding both sides (for example both kidneys).
        affine: 4x4 voxel-to-RAS+ world matrix of the mask's grid.
        body: Optional body mask on the same grid. The midline is its mean world x; without it,
            the mean world x of ``lumped`` itself (meaningful only when both sides are present).

    Returns:
        ``(right, left)`` boolean masks: world x at or above the midline is right (RAS+: +x points
        to the patient's right), below it left.

    Raises:
        GeometryError: on a bad affine or a ``body`` grid that differs from ``lumped``.
        DataError: when ``body`` is given but empty.
    """
    m = np.asarray(lumped, dtype=bool)
    a = check_affine(affine)
    if m.ndim != 3:
        raise GeometryError(f"expected a 3D mask, got shape {m.shape}")
    right = np.zeros(m.shape, dtype=bool)
    left = np.zeros(m.shape, dtype=bool)
    if body is not None:
        body = np.asarray(body, dtype=bool)
        if body.shape != m.shape:
            raise GeometryError(f"body mask shape {body.shape} differs from the label shape {m.shape}")
        midline = mean_world_x(body, a)
    elif m.any():
        midline = mean_world_x(m, a)
    else:
        return right, left
    idx = np.nonzero(m)
    x = a[0, 0] * idx[0] + a[0, 1] * idx[1] + a[0, 2] * idx[2] + a[0, 3]
    is_right = x >= midline
    right[tuple(i[is_right] for i in idx)] = True
    left[tuple(i[~is_right] for i in idx)] = True
    return right, left
