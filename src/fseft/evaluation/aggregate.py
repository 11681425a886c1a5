"""Aggregate per-case metric rows into per-structure statistics and serialise both.

NaN values (HD95 when a side is empty, relative volume error when the reference is empty) are
skipped by every statistic and counted in ``n_nan``; ``n`` counts the values that were used.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .metrics import StructureMetrics

#: The numeric columns of :class:`StructureMetrics`, in CSV order.
METRICS: tuple[str, ...] = tuple(
    f.name for f in fields(StructureMetrics) if f.name not in ("case", "structure", "flag")
)


@dataclass(frozen=True)
class SummaryRow:
    """Statistics of one metric of one structure over cases.

    Args:
        structure: Structure name.
        metric: Metric name (one of :data:`METRICS`).
        mean: Mean over the non-NaN values (NaN if there are none).
        std: Sample standard deviation (``ddof=1``; NaN with fewer than two values).
        median: Median over the non-NaN values.
        n: Number of non-NaN values.
        n_nan: Number of NaN values skipped.
    """

    structure: str
    metric: str
    mean: float
    std: float
    median: float
    n: int
    n_nan: int


def summarize(rows: Sequence[StructureMetrics]) -> list[SummaryRow]:
    """Per-structure statistics of every metric, structures in order of first appearance.

    Args:
        rows: Per-case metric rows.

    Returns:
        One :class:`SummaryRow` per structure and metric.
    """
    by_structure: dict[str, list[StructureMetrics]] = {}
    for row in rows:
        by_structure.setdefault(row.structure, []).append(row)
    summary = []
    for structure, group in by_structure.items():
        for metric in METRICS:
            values = np.array([getattr(r, metric) for r in group], dtype=np.float64)
            kept = values[~np.isnan(values)]
            n = int(kept.size)
            summary.append(
                SummaryRow(
                    structure=structure,
                    metric=metric,
                    mean=float(kept.mean()) if n else math.nan,
                    std=float(kept.std(ddof=1)) if n > 1 else math.nan,
                    median=float(np.median(kept)) if n else math.nan,
                    n=n,
                    n_nan=int(values.size - n),
                )
            )
    return summary


def to_csv(rows: Sequence[Any], columns: Sequence[str]) -> str:
    """Dataclass rows as CSV text with a header; floats written with full precision, NaN as ``nan``.

    Args:
        rows: Dataclass instances (e.g. :class:`StructureMetrics` or :class:`SummaryRow`).
        columns: Field names to write, in order.

    Returns:
        The CSV text.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(getattr(row, c)) for c in columns])
    return buffer.getvalue()


def to_json(rows: Sequence[StructureMetrics], summary: Sequence[SummaryRow], **meta: Any) -> dict[str, Any]:
    """A JSON-able document with both tables; NaN becomes ``null``.

    Args:
        rows: Per-case metric rows.
        summary: Per-structure statistics.
        **meta: Extra top-level entries (tolerance, inputs ...).

    Returns:
        ``{**meta, "cases": [...], "summary": [...]}``.
    """
    return {
        **meta,
        "cases": [_nan_to_none(asdict(r)) for r in rows],
        "summary": [_nan_to_none(asdict(s)) for s in summary],
    }


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
