"""A volume together with its geometry.

Convention (nibabel's): ``array`` is indexed ``[i, j, k]`` and ``affine`` maps a voxel index to
RAS+ world coordinates in millimetres. Readers of LPS formats (DICOM, NRRD, MHA via SimpleITK)
convert to this convention, so every image in the package speaks one geometry language.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class Image:
    """A 3D volume with its voxel-to-world affine.

    Args:
        array: Voxel values, shape ``(X, Y, Z)``.
        affine: 4x4 voxel-index -> RAS+ world (mm) matrix.
        path: Where it was read from (used in error messages), if anywhere.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim != 3:
            raise ValueError(f"image must be 3D, got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit column vectors: the world (RAS) direction of each array axis."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def origin(self) -> np.ndarray:
        """World (RAS, mm) position of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def axcodes(self) -> str:
        """Orientation codes such as ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory image>"

    def with_array(self, array: np.ndarray) -> Image:
        """The same geometry holding other voxel values."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match {self.array.shape}")
        return Image(array, self.affine.copy(), self.path)

    def same_grid(self, other: Image, atol: float = 1e-3) -> bool:
        """True when both images have the same shape and (within ``atol`` mm) the same affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))
