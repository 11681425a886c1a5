"""A PNG montage of synthetic cases: axial and coronal slices with label overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io_utils import atomic_path
from .cases import Case
from .io import read_image
from .synth_anatomy import LABEL_VALUES


def _ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` reoriented so its axes point to R, A, S (display only)."""
    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))


def write_montage(cases: Sequence[Case], path: Path, per_site: int = 1) -> Path:
    """Write ``path`` (PNG) showing ``per_site`` case(s) of each site: two axial slices and a coronal one.

    Slices are shown in the radiological convention (patient's right on the image's left, anterior
    up), with the label map blended in colour (window -160..240 HU).

    Args:
        cases: Cases with one label source each (as written by :func:`~fseft.data.synth.generate_assembly`).
        path: Output PNG.
        per_site: Cases shown per site.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    chosen: list[Case] = []
    for case in cases:
        if sum(c.site == case.site for c in chosen) < per_site:
            chosen.append(case)
    colours = plt.get_cmap("tab20")(np.arange(20))
    colours[:, 3] = 0.45
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(len(chosen), 3, figsize=(10.5, 3.4 * len(chosen)), squeeze=False)
    for row, case in zip(axes, chosen, strict=True):
        image = read_image(case.image)
        label = read_image(case.labels[0].path, dtype=None).array.astype(np.uint8)
        hu, lab = _ras(image.array, image.affine), _ras(label, image.affine)
        spacing = np.empty(3)
        spacing[nib.orientations.io_orientation(image.affine)[:, 0].astype(int)] = image.spacing
        fg = np.argwhere(lab > 0)
        centre = fg.mean(axis=0).astype(int) if len(fg) else np.array(hu.shape) // 2
        top = int(np.percentile(fg[:, 2], 80)) if len(fg) else centre[2]
        views = [
            (hu[::-1, :, top].T, lab[::-1, :, top].T, spacing[1] / spacing[0], f"axial z={top}"),
            (
                hu[::-1, :, centre[2]].T,
                lab[::-1, :, centre[2]].T,
                spacing[1] / spacing[0],
                f"axial z={centre[2]}",
            ),
            (
                hu[::-1, centre[1], :].T,
                lab[::-1, centre[1], :].T,
                spacing[2] / spacing[0],
                f"coronal y={centre[1]}",
            ),
        ]
        for ax, (img, lb, aspect, title) in zip(row, views, strict=True):
            ax.imshow(
                img, cmap="gray", vmin=-160, vmax=240, origin="lower", aspect=aspect, interpolation="nearest"
            )
            ax.imshow(
                np.ma.masked_equal(lb, 0),
                cmap=cmap,
                vmin=0.5,
                vmax=20.5,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
            ax.set_title(f"{case.case_id} ({image.axcodes} on disk) {title}", fontsize=8)
            ax.set_axis_off()
    handles = [Patch(color=colours[v - 1][:3], label=name) for name, v in LABEL_VALUES.items()]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
