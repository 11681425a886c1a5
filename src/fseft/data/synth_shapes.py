"""Analytic shapes of the synthetic phantom, evaluated on a world-aligned render grid.

Every shape is defined in phantom world coordinates (RAS+ mm, nibabel's convention: ``+x`` toward
the patient's right, ``+y`` anterior, ``+z`` superior) and reports an approximate *depth* in mm:
positive inside, the distance to its surface near it. Evaluation is restricted to the grid block
covering the shape's bounding box, so painting a small organ costs little.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RenderGrid:
    """A regular, axis-aligned grid in phantom world coordinates.

    Args:
        xs: Ascending world x (mm) of the grid planes along axis 0.
        ys: Ascending world y (mm) along axis 1.
        zs: Ascending world z (mm) along axis 2.
    """

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.xs), len(self.ys), len(self.zs))

    @property
    def spacing(self) -> np.ndarray:
        return np.array([self.xs[1] - self.xs[0], self.ys[1] - self.ys[0], self.zs[1] - self.zs[0]])

    def block(
        self, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Slices and broadcastable coordinates of the grid points inside the box ``[lo, hi]``.

        Returns:
            ``(slices, (x, y, z))`` with ``x`` of shape ``(n, 1, 1)`` etc., or ``None`` when the box
            misses the grid.
        """
        slices, coords = [], []
        for axis, values in enumerate((self.xs, self.ys, self.zs)):
            i0 = int(np.searchsorted(values, lo[axis], side="left"))
            i1 = int(np.searchsorted(values, hi[axis], side="right"))
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
            shape = [1, 1, 1]
            shape[axis] = i1 - i0
            coords.append(values[i0:i1].reshape(shape).astype(np.float32))
        return tuple(slices), tuple(coords)


class Shape(abc.ABC):
    """A solid with a bounding box (``lo``, ``hi`` in mm) and an approximate signed depth."""

    lo: np.ndarray
    hi: np.ndarray

    @abc.abstractmethod
    def region(self, grid: RenderGrid) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """``(slices, depth)`` over the grid block of the bounding box, or ``None`` if it misses.

        ``depth`` is in mm, positive inside and about the distance to the surface near it.
        """


class Blob(Shape):
    """A rotated ellipsoid with a smooth random radial deformation.

    Args:
        centre: World centre (mm).
        radii: Semi-axes (mm) along the rotated local axes.
        rotation: 3x3 matrix whose columns are the local axes in world coordinates.
        waves: ``(K, 5)`` rows ``(amplitude, wx, wy, wz, phase)``: the surface lies at normalised
            radius ``1 + sum(amplitude * sin(w . q + phase))`` of local coordinates ``q``.
    """

    def __init__(
        self, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray, waves: np.ndarray | None = None
    ) -> None:
        self.centre = np.asarray(centre, dtype=np.float32)
        self.radii = np.asarray(radii, dtype=np.float32)
        self.rotation = np.asarray(rotation, dtype=np.float32)
        self.waves = np.zeros((0, 5), np.float32) if waves is None else np.asarray(waves, np.float32)
        reach = float(self.radii.max()) * (1.0 + float(np.abs(self.waves[:, 0]).sum()))
        self.lo, self.hi = self.centre - reach, self.centre + reach
        self.scale = float(np.prod(self.radii) ** (1.0 / 3.0))

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        """Normalised local coordinates ``q`` (the unit ball is the undeformed ellipsoid)."""
        d = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        r = self.rotation
        return [(r[0, i] * d[0] + r[1, i] * d[1] + r[2, i] * d[2]) / self.radii[i] for i in range(3)]

    def region(self, grid: RenderGrid) -> tuple[tuple[slice, ...], np.ndarray] | None:
        found = grid.block(self.lo, self.hi)
        if found is None:
            return None
        slices, (x, y, z) = found
        q = self.local(x, y, z)
        s = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        bound = np.float32(1.0)
        for amp, wx, wy, wz, phase in self.waves:
            bound = bound + amp * np.sin(wx * q[0] + wy * q[1] + wz * q[2] + phase)
        return slices, (bound - s) * np.float32(self.scale)


class Tube(Shape):
    """A smooth tube: a Catmull-Rom spline through control points, swept by a varying radius.

    Args:
        points: ``(N, 3)`` control points (mm), N >= 2.
        radii: ``(N,)`` radius (mm) at each control point.
        subdivisions: Spline segments per control interval.
    """

    def __init__(self, points: np.ndarray, radii: np.ndarray, subdivisions: int = 6) -> None:
        p = np.asarray(points, dtype=np.float64)
        r = np.asarray(radii, dtype=np.float64)
        self.points, self.radii = _catmull_rom(p, r, subdivisions)
        reach = float(self.radii.max())
        self.lo = (self.points.min(axis=0) - reach).astype(np.float32)
        self.hi = (self.points.max(axis=0) + reach).astype(np.float32)

    def region(self, grid: RenderGrid) -> tuple[tuple[slice, ...], np.ndarray] | None:
        found = grid.block(self.lo, self.hi)
        if found is None:
            return None
        slices, _ = found
        out = np.full(tuple(s.stop - s.start for s in slices), -1e4, dtype=np.float32)
        segments = zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:], strict=True)
        for a, b, ra, rb in segments:
            reach = max(ra, rb)
            sub = grid.block(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
            if sub is None:
                continue
            sub_slices, (x, y, z) = sub
            d = (b - a).astype(np.float32)
            t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / max(float(d @ d), 1e-6)
            t = np.clip(t, 0.0, 1.0)
            dist = np.sqrt(
                (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
            )
            view = out[
                tuple(
                    slice(s.start - o.start, s.stop - o.start)
                    for s, o in zip(sub_slices, slices, strict=True)
                )
            ]
            np.maximum(view, (ra + t * (rb - ra) - dist).astype(np.float32), out=view)
        return slices, out


def _catmull_rom(points: np.ndarray, radii: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Densify a polyline (and its radii) with a centripetal-free uniform Catmull-Rom spline."""
    if len(points) < 3:
        t = np.linspace(0.0, 1.0, n + 1)[:, None]
        return points[0] + t * (points[-1] - points[0]), radii[0] + t[:, 0] * (radii[-1] - radii[0])
    p = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    r = np.concatenate([[radii[0]], radii, [radii[-1]]])
    t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
    w = np.hstack(
        [
            -0.5 * t**3 + t**2 - 0.5 * t,
            1.5 * t**3 - 2.5 * t**2 + 1,
            -1.5 * t**3 + 2 * t**2 + 0.5 * t,
            0.5 * t**3 - 0.5 * t**2,
        ]
    )
    pts, rad = [], []
    for i in range(1, len(p) - 2):
        pts.append(w @ p[i - 1 : i + 3])
        rad.append(np.clip(w @ r[i - 1 : i + 3], min(radii), max(radii)))
    return np.vstack([*pts, points[-1:]]), np.concatenate([*rad, radii[-1:]])


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns = rotated axes) from angles in degrees about z, then y, then x."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def smooth_field(rng: np.random.Generator, grid: RenderGrid, cell_mm: float) -> np.ndarray:
    """A smooth random field (about zero mean, unit spread) on ``grid``, varying over ``cell_mm``.

    White noise on a coarse lattice ``cell_mm`` apart, anchored at the world origin (the phantom
    frame, so the texture moves with the patient and not with the field of view), interpolated
    linearly onto the grid: far cheaper than filtering noise on the render grid itself.

    Args:
        rng: Random generator (consumed).
        grid: The render grid.
        cell_mm: Lattice spacing in mm; features are about this size.
    """
    axes = (grid.xs, grid.ys, grid.zs)
    first = [np.floor(a[0] / cell_mm) for a in axes]
    counts = [int(np.floor(a[-1] / cell_mm) - f) + 2 for a, f in zip(axes, first, strict=True)]
    lattice = rng.standard_normal(counts, dtype=np.float32)
    positions = [a / cell_mm - f for a, f in zip(axes, first, strict=True)]
    return sample_axes(lattice, positions, linear=True) * np.float32(1.6)


def sample_axes(volume: np.ndarray, positions: list[np.ndarray], linear: bool) -> np.ndarray:
    """Sample ``volume`` at fractional index positions given separately for each axis.

    Args:
        volume: 3D array.
        positions: One 1D array of (fractional) indices per axis; the output has their lengths.
        linear: Trilinear interpolation (else nearest neighbour). Positions are clamped to the volume.

    Returns:
        The sampled array (float32 for linear sampling, ``volume``'s dtype otherwise).
    """
    out = volume
    for axis, pos in enumerate(positions):
        n = out.shape[axis]
        if linear:
            i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
            f = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = len(pos)
            a = np.take(out, i0, axis=axis).astype(np.float32, copy=False)
            out = a + (np.take(out, i0 + 1, axis=axis) - a) * f.reshape(shape)
        else:
            out = np.take(out, np.clip(np.rint(pos).astype(int), 0, n - 1), axis=axis)
    return out
