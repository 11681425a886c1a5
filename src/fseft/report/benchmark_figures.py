"""Figures of the benchmark report: per-group Dice-vs-k and per-case spread, and the grid of one
query case with the reference and every method's prediction at every ``k``.

Each method keeps one colour on every figure of the page (:func:`method_colors`); the reference is
always drawn in :data:`REFERENCE_COLOR`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .figures import _PALETTE, draw_slice, to_png

if TYPE_CHECKING:
    from .snapshots import QuerySnapshot

REFERENCE_COLOR = "#ffd60a"
#: Margin around the reference when cropping grid panels: a fraction of its extent, at least this many pixels.
_CROP_FRACTION, _CROP_MIN_PX = 0.6, 16


def method_colors(labels: Sequence[str]) -> dict[str, str]:
    """One colour per method label, in order (the same on every figure and table of the page)."""
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}


def group_figure(
    title: str,
    curves: Mapping[str, Mapping[int, tuple[float, float]]],
    per_case: Mapping[str, Mapping[str, Sequence[float]]],
    columns: Sequence[str],
    colors: Mapping[str, str],
) -> bytes:
    """Two panels for one task group: Dice against ``k`` (mean ± std over seeds as a band) and
    every query's Dice per method and support size (dots, with the mean as a bar).

    Args:
        title: Group title (panel titles start with it).
        curves: Method -> k -> (mean, std) Dice.
        per_case: Method -> column -> per-case Dice.
        columns: Columns of the spread panel, in order.
        colors: Method -> colour.

    Returns:
        PNG bytes.
    """
    fig = Figure(figsize=(11, 3.6))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": (1, 1.5)})
    ks = sorted({k for by_k in curves.values() for k in by_k})
    for method, by_k in curves.items():
        x = sorted(by_k)
        mean = np.array([by_k[k][0] for k in x])
        std = np.array([by_k[k][1] for k in x])
        left.plot(x, mean, marker="o", color=colors[method], label=method)
        left.fill_between(x, mean - std, mean + std, color=colors[method], alpha=0.15, linewidth=0)
    left.set_xticks(ks)
    left.set(title=f"{title}: Dice against k", xlabel="k (support scans)", ylabel="Dice", ylim=(0, 1))
    methods = list(per_case)
    width = 0.8 / max(len(methods), 1)
    rng = np.random.default_rng(0)
    for i, method in enumerate(methods):
        for j, column in enumerate(columns):
            values = np.asarray(per_case[method].get(column, ()), float)
            if not values.size:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            right.scatter(x + rng.uniform(-width / 5, width / 5, values.size), values, s=14,
                          color=colors[method], alpha=0.8, zorder=3)  # fmt: skip
            right.hlines(values.mean(), x - width / 2.5, x + width / 2.5, color=colors[method], linewidth=2.5)
    right.set_xticks(range(len(columns)), [f"k = {c}" for c in columns])
    right.set(title=f"{title}: Dice of every query case", ylabel="Dice", ylim=(-0.02, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[m], marker="o", label=m) for m in dict.fromkeys([*curves, *methods])]
    fig.legend(handles=handles, loc="upper center", ncols=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return to_png(fig)


def _crop(reference: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns around the reference (the whole plane when it is empty)."""
    if not reference.any():
        return slice(None), slice(None)
    spans = []
    for axis in (0, 1):
        idx = np.flatnonzero(reference.any(axis=1 - axis))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        margin = max(_CROP_MIN_PX, int(_CROP_FRACTION * (hi - lo)))
        spans.append(slice(max(0, lo - margin), min(reference.shape[axis], hi + margin)))
    return spans[0], spans[1]


def snapshot_grid(
    rows: Mapping[str, Mapping[str, tuple[QuerySnapshot, float | None]]],
    columns: Sequence[str],
    colors: Mapping[str, str],
) -> bytes:
    """One query case: a first row with the reference, then one row per method; for each support
    size an axial and a coronal panel with the reference and the method's prediction outlined.

    Args:
        rows: Method -> column -> (snapshot, the query's Dice); a missing column stays blank.
        columns: Support sizes, in order.
        colors: Method -> colour.

    Returns:
        PNG bytes.
    """
    first = next(s for by_col in rows.values() for s, _ in by_col.values())
    views = tuple(first.ct)
    crops = {v: _crop(first.reference[v] > 0) for v in views}
    ncols = len(columns) * len(views)
    fig = Figure(figsize=(2.3 * ncols + 1.2, 2.3 * (len(rows) + 1) + 0.4))
    axes = fig.subplots(len(rows) + 1, ncols, squeeze=False)
    for c, view in enumerate(views):
        ref = first.reference[view][crops[view]] > 0
        draw_slice(axes[0, c], first.ct[view][crops[view]], first.aspect[view], [(ref, REFERENCE_COLOR, 1.6)])
        axes[0, c].set_title(view, fontsize=9)
    axes[0, 0].set_ylabel("reference", fontsize=10, color="#7a6200", fontweight="bold")
    for ax in axes[0, len(views) :]:
        ax.set_visible(False)
    for r, (method, by_col) in enumerate(rows.items(), start=1):
        for j, column in enumerate(columns):
            for v, view in enumerate(views):
                ax = axes[r, j * len(views) + v]
                if column not in by_col:
                    ax.set_visible(False)
                    continue
                snap, dice = by_col[column]
                crop = crops[view]
                draw_slice(ax, snap.ct[view][crop], snap.aspect[view],
                           [(snap.reference[view][crop] > 0, REFERENCE_COLOR, 1.0),
                            (snap.prediction[view][crop] > 0, colors[method], 1.8)])  # fmt: skip
                if r == 1:
                    ax.set_title(f"k = {column} · {view}", fontsize=9)
                if v == 0 and dice is not None:
                    ax.text(0.03, 0.04, f"Dice {dice:.2f}", transform=ax.transAxes, color="white", fontsize=8,
                            bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "linewidth": 0})  # fmt: skip
        axes[r, 0].set_ylabel(method, fontsize=10, color=colors[method], fontweight="bold")
    handles = [Line2D([], [], color=REFERENCE_COLOR, lw=2, label="reference"),
               *(Line2D([], [], color=colors[m], lw=2, label=m) for m in rows)]  # fmt: skip
    fig.legend(handles=handles, loc="upper center", ncols=min(len(handles), 6), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return to_png(fig, dpi=90)


__all__ = ["REFERENCE_COLOR", "group_figure", "method_colors", "snapshot_grid"]
