"""Report figures as PNG bytes (matplotlib's Agg canvas; no pyplot state, no display needed).

Slices are shown in the radiological convention whatever the file's orientation: volumes are
first reoriented to RAS (nibabel), then axial and coronal views put the patient's right on the
image's left, sagittal views put anterior on the left, and superior / anterior is up.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from matplotlib import __version__ as mpl_version
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..data.image import Image

#: Soft-tissue CT window (HU): level 40, width 400.
CT_WINDOW = (-160.0, 240.0)
GT_COLOR = "#00d26a"
PRED_COLOR = "#ff3b30"
VIEWS = ("axial", "coronal", "sagittal")
#: ``boxplot(orientation=...)`` replaced ``vert=`` in matplotlib 3.10.
_HORIZONTAL = (
    {"orientation": "horizontal"}
    if tuple(int(v) for v in mpl_version.split(".")[:2]) >= (3, 10)
    else {"vert": False}
)
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


@dataclass(frozen=True)
class OverlayRow:
    """One structure of one case: what to outline.

    Args:
        structure: Structure name (row title).
        pred: Predicted mask on the image grid (``None`` when the prediction lacks the structure).
        gt: Reference mask on the image grid (``None`` when there is no reference).
        dice: Dice shown in the row title, if known.
    """

    structure: str
    pred: np.ndarray | None
    gt: np.ndarray | None
    dice: float | None = None


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))


def _ras_spacing(image: Image) -> tuple[float, float, float]:
    ornt = nib.orientations.io_orientation(image.affine)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = image.spacing[axis]
    return tuple(spacing)  # type: ignore[return-value]


def _view(volume: np.ndarray, view: str, index: Sequence[int]) -> np.ndarray:
    """A 2D slice of a RAS volume, rows top-to-bottom and columns in display order."""
    x, y, z = (int(i) for i in index)
    plane = {"axial": volume[:, :, z], "coronal": volume[:, y, :], "sagittal": volume[x, :, :]}[view]
    return plane.T[::-1, ::-1]


def _aspect(view: str, spacing: Sequence[float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def draw_slice(
    ax: Axes, ct: np.ndarray, aspect: float, outlines: Sequence[tuple[np.ndarray, str, float]]
) -> None:
    """Draw a CT plane (soft-tissue window) with mask outlines.

    Args:
        ax: The axes.
        ct: CT plane in HU, display order.
        aspect: Pixel aspect ratio (height / width in mm).
        outlines: ``(mask plane, colour, line width)``; empty masks are skipped.
    """
    ax.imshow(ct, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect, interpolation="bilinear")
    for mask, color, width in outlines:
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=width)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_figure(image: Image, rows: Sequence[OverlayRow]) -> bytes:
    """Axial, coronal and sagittal slices through each structure's centroid, reference and
    prediction outlined in two colours.

    Args:
        image: The CT (HU); masks lie on its grid.
        rows: One row of three views per structure; the centroid is the reference's (the
            prediction's when the reference is empty).

    Returns:
        PNG bytes.
    """
    ct = np.clip(_to_ras(image.array, image.affine), *CT_WINDOW)
    spacing = _ras_spacing(image)
    fig = Figure(figsize=(11, 3.6 * max(len(rows), 1) + 0.6))
    axes = fig.subplots(max(len(rows), 1), 3, squeeze=False)
    for r, row in enumerate(rows):
        gt = _to_ras(row.gt, image.affine) if row.gt is not None else None
        pred = _to_ras(row.pred, image.affine) if row.pred is not None else None
        source = gt if gt is not None and gt.any() else pred
        if source is not None and source.any():
            centre = np.rint(np.argwhere(source).mean(axis=0)).astype(int)
        else:
            centre = np.asarray(ct.shape) // 2
        for c, view in enumerate(VIEWS):
            ax = axes[r, c]
            outlines = [(_view(m, view, centre), color, 1.6) for m, color in ((gt, GT_COLOR), (pred, PRED_COLOR))
                        if m is not None]  # fmt: skip
            draw_slice(ax, _view(ct, view, centre), _aspect(view, spacing), outlines)
            ax.set_title(view, fontsize=10)
        dice = "" if row.dice is None or math.isnan(row.dice) else f"  (Dice {row.dice:.3f})"
        axes[r, 0].set_ylabel(f"{row.structure}{dice}", fontsize=11)
    handles = [Line2D([], [], color=GT_COLOR, lw=2, label="reference"),
               Line2D([], [], color=PRED_COLOR, lw=2, label="prediction")]  # fmt: skip
    fig.legend(handles=handles, loc="upper right", ncols=2, frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return to_png(fig)


def boxplot_figure(values: Mapping[str, Mapping[str, Sequence[float]]]) -> bytes:
    """Horizontal per-structure box plots (with the individual cases as dots), one panel per metric.

    Args:
        values: Metric title -> structure -> per-case values (NaN skipped).

    Returns:
        PNG bytes.
    """
    metrics = list(values)
    structures = list(dict.fromkeys(s for m in metrics for s in values[m]))
    fig = Figure(figsize=(5.2 * len(metrics), 0.45 * len(structures) + 1.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics, strict=True):
        data = [np.asarray([v for v in values[metric].get(s, ()) if not math.isnan(v)]) for s in structures]
        positions = np.arange(len(structures))[::-1]
        shown = [(d, p) for d, p in zip(data, positions, strict=True) if d.size]
        if shown:
            ax.boxplot([d for d, _ in shown], positions=[p for _, p in shown], widths=0.6, **_HORIZONTAL,
                       showfliers=False, patch_artist=True,
                       boxprops={"facecolor": "#dbe9f6", "edgecolor": "#1f4e79"},
                       medianprops={"color": "#c0392b", "linewidth": 2})  # fmt: skip
            for d, p in shown:
                ax.scatter(
                    d, p + rng.uniform(-0.15, 0.15, d.size), s=12, color="#1f4e79", alpha=0.7, zorder=3
                )
        ax.set_yticks(positions, structures)
        ax.set_title(metric, fontsize=11)
        ax.grid(axis="x", alpha=0.3)
        if "dice" in metric.lower() or "nsd" in metric.lower():
            ax.set_xlim(-0.02, 1.02)
    fig.tight_layout()
    return to_png(fig)


def dice_vs_k_figure(curves: Mapping[str, Mapping[str, Mapping[int, Sequence[float]]]]) -> bytes:
    """Dice against the number of support scans ``k``: one panel per structure, one line per method,
    mean ± standard deviation over seeds as a band.

    Args:
        curves: Panel title -> method -> k -> per-seed Dice values.

    Returns:
        PNG bytes.
    """
    panels = list(curves)
    methods = list(dict.fromkeys(m for p in panels for m in curves[p]))
    colors = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    ks_all: set[int] = set()
    for ax, panel in zip(axes, panels, strict=False):
        for method, by_k in curves[panel].items():
            ks = sorted(by_k)
            ks_all.update(ks)
            mean = np.array([np.nanmean(by_k[k]) for k in ks])
            std = np.array([np.nanstd(by_k[k], ddof=1) if len(by_k[k]) > 1 else 0.0 for k in ks])
            ax.plot(ks, mean, marker="o", color=colors[method], label=method)
            ax.fill_between(ks, mean - std, mean + std, color=colors[method], alpha=0.15, linewidth=0)
        ax.set_title(panel, fontsize=11)
        ax.set_xlabel("k (support scans)")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[: len(panels)]:
        ax.set_xticks(sorted(ks_all))
    handles = [Line2D([], [], color=colors[m], marker="o", label=m) for m in methods]
    fig.legend(handles=handles, loc="upper center", ncols=min(len(methods), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.4 * nrows + 0.5)))
    return to_png(fig)
