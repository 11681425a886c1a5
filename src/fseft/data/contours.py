"""Planar contours of binary slices and back: what RT Structure Sets store instead of voxels.

Contours are traced by marching squares at level 0.5 (:mod:`contourpy`, matplotlib's contouring
library), so they run halfway between inside and outside pixel centres: every inside pixel centre is
enclosed and every outside one is not. Filling the polygons by pixel centre with the even-odd rule
(nested contours are holes, the reading of RT Structure Sets that planning systems and 3D Slicer
share) gives the slice back exactly. Coordinates are continuous pixel indices ``(column, row)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import contourpy
import numpy as np
from matplotlib.path import Path as MplPath


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """The closed contours of a binary slice.

    Args:
        mask: 2D boolean slice indexed ``[row, column]``.

    Returns:
        One ``(N, 2)`` float array of ``(column, row)`` vertices per contour (not repeating the first
        vertex, collinear vertices removed); outer boundaries and hole boundaries alike.
    """
    padded = np.pad(np.asarray(mask, dtype=np.float64), 1)  # every contour closes inside the padding
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    polygons = []
    for line in generator.lines(0.5):
        points = np.asarray(line, dtype=np.float64)[:-1] - 1.0  # closed: last vertex repeats the first
        points = _drop_collinear(points)
        if len(points) >= 3:
            polygons.append(points)
    return polygons


def fill_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise closed contours onto a slice by pixel centre, with the even-odd rule.

    Args:
        polygons: ``(N, 2)`` arrays of ``(column, row)`` vertices (continuous pixel indices).
        shape: ``(rows, columns)`` of the slice.

    Returns:
        Boolean slice: pixels whose centre lies inside an odd number of contours.
    """
    out = np.zeros(shape, dtype=bool)
    for points in polygons:
        lo = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, (shape[1], shape[0]))
        if np.any(hi <= lo):
            continue
        cols, rows = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]))
        centres = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
        ring = MplPath(np.vstack([points, points[:1]]), closed=True)  # the closing vertex is not drawn
        inside = ring.contains_points(centres).reshape(cols.shape)
        out[lo[1] : hi[1], lo[0] : hi[0]] ^= inside
    return out


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight segment between their neighbours (closed ring)."""
    if len(points) < 4:
        return points
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(cross) > 1e-9]
