"""Benchmark outputs from cell results: per-case CSV, per-seed CSV and the paper-style Markdown tables.

Aggregation follows the paper: for each cell (task, method, k, seed) the metric is averaged over the
query cases (and the task's structures); within a task group the per-task values of one seed are
averaged over the group's tasks; the table shows the mean ± standard deviation (``ddof=1``) of that
over seeds. The ``all`` column is the upper bound trained on every support case of each task; a
row without all-train cells shows its family's ceiling there in parentheses
(:mod:`fseft.benchmark.ceilings`), and ``k=K − all`` is the gap between the largest support size and
that ceiling. After the group tables, one Dice table per task.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io_utils import write_text_atomic
from ..report.groups import (
    Stat,
    cell_mean,
    format_bytes,
    incomplete_note,
    partial_column_note,
    summarise_group,
)
from .ceilings import ceiling_rows
from .cells import SCORES, CellResult
from .planning import ALL

PER_CASE_CSV = "results_per_case.csv"
PER_SEED_CSV = "results_per_seed.csv"
TABLES_MD = "results.md"
PER_CASE_COLUMNS = (
    "task", "group", "method", "method_name", "decoder", "transductive", "k", "all_train", "seed", "case",
    "structure", "dice", "hd95_mm", "nsd", "vol_pred_ml", "vol_gt_ml", "flag", "trainable_params",
    "adapter_bytes", "peak_memory_bytes", "adapt_wall_s",
)  # fmt: skip
PER_SEED_COLUMNS = ("task", "group", "method", "k", "seed", "structure", "dice", "hd95_mm", "nsd")
COST_NOTE = (
    "Cost columns: trainable parameters, adapter file size and adaptation wall time are means over the "
    "row's cells of the group; peak memory is the largest over them (on a GPU the CUDA max allocated, on "
    "CPU the process's peak resident set, which includes the loaded model and cached features)."
)
_METRIC_NAMES = {"dice": ("dice", "Dice"), "nsd": ("nsd", "NSD"), "hd95": ("hd95_mm", "HD95 (mm)")}


def per_case_rows(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """One row per (cell, query case, structure), in grid order."""
    rows = []
    for data in _ordered(cells):
        c, cost = data.cell, data.cost
        for m in data.metrics:
            rows.append({
                "task": c.task, "group": c.group, "method": c.label, "method_name": data.method,
                "decoder": data.decoder, "transductive": data.transductive, "k": c.k,
                "all_train": c.all_train, "seed": c.seed, **m.to_dict(),
                "trainable_params": cost.trainable_params, "adapter_bytes": cost.adapter_bytes,
                "peak_memory_bytes": cost.peak_memory_bytes, "adapt_wall_s": cost.adapt_wall_s,
            })  # fmt: skip
    return rows


def per_seed_rows(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """One row per cell: metrics averaged over its query cases and structures.

    The ``structure`` column holds the task name, so :func:`fseft.report.build_report` draws one
    Dice-vs-k panel per task.
    """
    rows = []
    for data in _ordered(cells):
        c = data.cell
        means = {key: cell_mean(data, key) for key in SCORES}
        rows.append({"task": c.task, "group": c.group, "method": c.label, "k": c.k,
                     "seed": c.seed, "structure": c.task, **means})  # fmt: skip
    return rows


def _ordered(cells: Sequence[CellResult]) -> list[CellResult]:
    def key(d: CellResult) -> tuple[Any, ...]:
        c = d.cell
        return (c.task_index, c.method_index, c.all_train, c.k, c.seed)

    return sorted(cells, key=key)


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header; floats with full precision, missing values as ``nan``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(c)) for c in columns])
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return repr(value) if isinstance(value, float) else value


def group_table(cells: Sequence[CellResult], group: str, metric: str = "dice", *, cost: bool = True) -> str:
    """The Markdown table of one task group: rows methods, columns k, mean ± std over seeds.

    Drawn from :func:`fseft.report.groups.summarise_group`, as the HTML report's table is.

    Args:
        cells: Cell results (any order; only those of ``group`` are used).
        group: Task group.
        metric: ``dice``, ``nsd`` or ``hd95``.
        cost: Add the cost columns (trainable parameters, adapter file size and adaptation wall
            time averaged over the method's cells in the group; the largest peak memory).

    Returns:
        The table (with a title line and notes on rows left out and columns over some tasks).
    """
    key, title = _METRIC_NAMES[metric]
    summary = summarise_group(cells, group)
    rows = {row.label: row for row in summary.methods}
    owners = ceiling_rows([d for d in cells if d.cell.group == group])
    tasks = summary.column_tasks
    ks = [c for c in summary.columns if c != ALL]
    has_all = ALL in summary.columns
    gap = f"k={ks[-1]} − {ALL}" if has_all and ks else None
    heads = [f"k={k}" for k in ks] + ([ALL] if has_all else []) + ([gap] if gap else [])
    costs = ["trainable params", "adapter size", "peak memory", "adapt time"] if cost else []
    lines = [
        f"**{group}** tasks ({', '.join(summary.tasks)}): {title}, mean ± std over seeds",
        "",
        "| method | " + " | ".join(heads + costs) + " |",
        "|---|" + "---:|" * (len(heads) + len(costs)),
    ]
    for row in summary.methods:
        text = [row.label] + [row.scores[(key, k)].text() for k in ks]
        owner = rows.get(owners.get(row.label, row.label))
        if has_all:
            ceiling = owner.scores[(key, ALL)].text() if owner else "–"
            text.append(ceiling if owner is row or ceiling == "–" else f"({ceiling})")
        if gap:
            both = set(tasks[ks[-1]]) & set(tasks[ALL])  # the same tasks on both sides
            few = row.seed_means(key, ks[-1], both)
            text.append(_gap(few, owner.seed_means(key, ALL, both) if owner else {}))
        if cost:
            text += [f"{row.trainable_params:,}", format_bytes(row.adapter_bytes),
                     format_bytes(row.peak_memory_bytes), f"{row.mean_adapt_s:.1f} s"]  # fmt: skip
        lines.append("| " + " | ".join(text) + " |")
    if summary.incomplete:
        lines.append("\n" + incomplete_note(summary.incomplete))
    lines += ["\n" + partial_column_note(c, kept) for c, kept in summary.partial_columns().items()]
    return "\n".join(lines)


def _gap(few: Mapping[int, float], ceiling: Mapping[int, float]) -> str:
    """The few-shot value minus the ceiling's, averaged over the seeds both have (a partial run may
    have more seeds of one); ``–`` when they share none."""
    gap = _mean([few[s] - ceiling[s] for s in few.keys() & ceiling.keys()])
    return f"{gap:+.3f}" if math.isfinite(gap) else "–"


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (ddof=1) of the finite values, the value alone when there is one, ``–`` when none."""
    return Stat.of(values).text()


def markdown(cells: Sequence[CellResult], metrics: Sequence[str] = ("dice",), title: str = "") -> str:
    """All tables: per task group, the Dice table with cost columns, then one table per other metric;
    then, when a group has several tasks, one Dice table per task."""
    ordered = _ordered(cells)
    groups = list(dict.fromkeys(d.cell.group for d in ordered))
    parts = [f"# {title}"] if title else []
    parts.append(COST_NOTE)
    for group in groups:
        parts.append(group_table(cells, group, "dice"))
        parts += [group_table(cells, group, m, cost=False) for m in metrics if m != "dice"]
    tasks = list(dict.fromkeys(d.cell.task for d in ordered))
    if len(tasks) > len(groups):
        parts.append("## Per task")
        for task in tasks:
            mine = [d for d in ordered if d.cell.task == task]
            parts.append(group_table(mine, mine[0].cell.group, "dice", cost=False))
    return "\n\n".join(parts) + "\n"


def write_outputs(
    cells: Sequence[CellResult], out: str | Path, metrics: Sequence[str] = ("dice",), title: str = ""
) -> dict[str, Path]:
    """Write the per-case CSV, the per-seed CSV and the Markdown tables under ``out``.

    Returns:
        ``{"per_case": ..., "per_seed": ..., "tables": ...}`` paths.
    """
    out = Path(out)
    paths = {"per_case": out / PER_CASE_CSV, "per_seed": out / PER_SEED_CSV, "tables": out / TABLES_MD}
    write_text_atomic(paths["per_case"], to_csv(per_case_rows(cells), PER_CASE_COLUMNS))
    write_text_atomic(paths["per_seed"], to_csv(per_seed_rows(cells), PER_SEED_COLUMNS))
    write_text_atomic(paths["tables"], markdown(cells, metrics, title))
    return paths


__all__ = [
    "mean_std",
    "PER_CASE_CSV",
    "PER_SEED_CSV",
    "TABLES_MD",
    "group_table",
    "markdown",
    "per_case_rows",
    "per_seed_rows",
    "to_csv",
    "write_outputs",
]
