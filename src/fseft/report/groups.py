"""Benchmark cells summarised per task group, for the report: one table and one set of curves per
group (``base``, ``novel``), never one mean over both.

Per cell a metric is averaged over its query cases and structures (undefined values skipped);
within a group a method's value for one seed and ``k`` is the mean over the group's tasks that have
that ``k`` (a task may have its own support sizes, e.g. esophagus [1, 3]); a method that lacks one
of the group's tasks never enters that mean (it is listed as incomplete);
the tables show the mean ± standard deviation of that over seeds. Cost columns average the
method's cells of the group (adaptation time also per ``k``), except peak memory: the largest.
The Markdown tables (:mod:`fseft.benchmark.tables`) and the HTML report are both drawn from
:func:`summarise_group`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the benchmark imports the report: no import cycle at run time
    from ..benchmark.cells import CellResult

#: Metric keys of a cell's metric rows summarised per group, with their titles.
GROUP_METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"), ("nsd", "NSD"))


@dataclass(frozen=True)
class Stat:
    """Mean ± standard deviation (``ddof=1``) over seeds.

    Args:
        mean: Mean (NaN without a value).
        std: Standard deviation (NaN with fewer than two seeds).
        n: Number of seeds.
    """

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        """The statistic of the finite ``values``."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, 0)
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        return cls(float(np.mean(finite)), std, len(finite))

    def text(self, digits: int = 3) -> str:
        """``mean ± std``, the mean alone from one seed, ``–`` from none."""
        if not self.n:
            return "–"
        spread = "" if math.isnan(self.std) else f" ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}{spread}"


@dataclass(frozen=True)
class MethodSummary:
    """One method's row of a group.

    Args:
        label: Row label.
        scores: ``(metric key, column)`` -> statistic over seeds.
        by_seed: ``(metric key, column)`` -> seed -> task -> the cell's mean (what ``scores`` is
            computed from; see :meth:`seed_means`).
        per_case: Column -> Dice of every (task, query case, structure, seed).
        trainable_params: Mean trainable parameters.
        adapter_bytes: Mean adapter file size.
        peak_memory_bytes: Largest peak memory of the adaptations.
        memory_kind: What the peak memory measures.
        adapt_s: Column -> mean adaptation wall time.
        mean_adapt_s: Mean adaptation wall time over all the method's cells of the group.
    """

    label: str
    scores: Mapping[tuple[str, str], Stat]
    by_seed: Mapping[tuple[str, str], Mapping[int, Mapping[str, float]]]
    per_case: Mapping[str, tuple[float, ...]]
    trainable_params: int
    adapter_bytes: float
    peak_memory_bytes: float
    memory_kind: str
    adapt_s: Mapping[str, float]
    mean_adapt_s: float

    def seed_means(self, key: str, column: str, tasks: Iterable[str]) -> dict[int, float]:
        """Seed -> ``key`` in ``column`` averaged over ``tasks`` (NaN for a seed missing one of them)."""
        return _seed_means(self.by_seed.get((key, column), {}), tasks)


@dataclass(frozen=True)
class GroupSummary:
    """A task group's table.

    Args:
        group: Group name.
        tasks: Its tasks.
        columns: Support sizes as column names (``"1"``, ``"5"``, ``"all"``), ascending ``k`` first.
        methods: Rows, in protocol order.
        incomplete: Methods left out because they lack one of the group's tasks.
        column_tasks: Column -> the tasks its means are over (see :func:`tasks_by_column`).
    """

    group: str
    tasks: tuple[str, ...]
    columns: tuple[str, ...]
    methods: tuple[MethodSummary, ...]
    incomplete: tuple[str, ...]
    column_tasks: Mapping[str, tuple[str, ...]]

    def partial_columns(self) -> dict[str, tuple[str, ...]]:
        """Columns averaged over only some of the group's tasks -> those tasks."""
        return {c: t for c, t in self.column_tasks.items() if set(t) != set(self.tasks)}


def groups(cells: Sequence[CellResult]) -> list[str]:
    """Task groups in protocol order."""
    ordered = sorted(cells, key=lambda d: (d.cell.task_index, d.cell.method_index))
    return list(dict.fromkeys(d.cell.group for d in ordered))


def method_labels(cells: Sequence[CellResult]) -> list[str]:
    """Row labels in protocol order (the order colours are given in)."""
    return list(dict.fromkeys(d.cell.label for d in sorted(cells, key=lambda d: d.cell.method_index)))


def cell_mean(cell: CellResult, key: str) -> float:
    """``key`` averaged over the cell's query cases and structures (NaN when never defined)."""
    values = [float(v) for v in (getattr(m, key) for m in cell.metrics) if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def tasks_by_column(cells: Sequence[CellResult]) -> dict[str, tuple[str, ...]]:
    """Column -> the tasks with a cell of their own there, in first-seen order (a method that trains
    nothing stands under every ``k`` and decides no column)."""
    present: dict[str, dict[str, None]] = {}
    for d in cells:
        if not d.k_independent:
            present.setdefault(d.cell.column, {})[d.cell.task] = None
    return {c: tuple(t) for c, t in present.items()}


def mean_over_tasks(by_task: Mapping[str, float], expected: Iterable[str]) -> float:
    """The mean of ``by_task`` over the ``expected`` tasks, undefined (NaN) values skipped as in
    :func:`cell_mean`; NaN when a task has no cell (a seed that misses a task never averages fewer)."""
    expected = set(expected)
    if not expected <= by_task.keys():
        return math.nan
    finite = [by_task[t] for t in expected if math.isfinite(by_task[t])]
    return float(np.mean(finite)) if finite else math.nan


def _seed_means(by_seed: Mapping[int, Mapping[str, float]], tasks: Iterable[str]) -> dict[int, float]:
    tasks = tuple(tasks)
    return {seed: mean_over_tasks(by_task, tasks) for seed, by_task in by_seed.items()}


def incomplete_note(labels: Sequence[str]) -> str:
    """The footnote naming the rows left out of a group's table (see :attr:`GroupSummary.incomplete`)."""
    return f"Left out (not run on every task of the group): {', '.join(labels)}"


def partial_column_note(column: str, kept: Sequence[str]) -> str:
    """The footnote of a column averaged over only some of a group's tasks."""
    head = f"k={column}" if column.isdigit() else column
    return f"{head}: mean over {', '.join(kept)} (the group's other tasks have no cell there)"


def cell_columns(cell: CellResult, columns: Sequence[str]) -> list[str]:
    """The columns a cell stands for: every ``k`` for a method that trains nothing, else its own."""
    return [c for c in columns if c.isdigit()] if cell.k_independent else [cell.cell.column]


def summarise_group(cells: Sequence[CellResult], group: str) -> GroupSummary:
    """Summarise the cells of one task group (cells of other groups are ignored).

    Args:
        cells: Cell results of the benchmark (any order).
        group: The task group.

    Returns:
        The group's :class:`GroupSummary`.
    """
    mine = sorted((d for d in cells if d.cell.group == group), key=lambda d: (d.cell.task_index, d.cell.k))
    tasks = tuple(dict.fromkeys(d.cell.task for d in mine))
    ks = sorted({d.cell.k for d in mine if not d.cell.all_train and not d.k_independent})
    ks = ks or sorted({d.cell.k for d in mine if not d.cell.all_train})
    columns = tuple([str(k) for k in ks] + list(dict.fromkeys(d.cell.column for d in mine if d.cell.all_train)))
    present = tasks_by_column(mine)
    column_tasks = {c: present.get(c, tasks) for c in columns}
    rows, incomplete = [], []
    for label in method_labels(mine):
        own = [d for d in mine if d.cell.label == label]
        if {d.cell.task for d in own} != set(tasks):
            incomplete.append(label)
            continue
        rows.append(_method_summary(label, own, column_tasks))
    return GroupSummary(group, tasks, columns, tuple(rows), tuple(incomplete), column_tasks)


def _method_summary(
    label: str, own: Sequence[CellResult], column_tasks: Mapping[str, Sequence[str]]
) -> MethodSummary:
    columns = list(column_tasks)
    by_seed: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    per_case: dict[str, list[float]] = {c: [] for c in columns}
    adapt: dict[str, list[float]] = {c: [] for c in columns}
    for d in own:
        for column in cell_columns(d, columns):
            for key, _ in GROUP_METRICS:
                by_seed.setdefault((key, column), {}).setdefault(d.cell.seed, {})[d.cell.task] = cell_mean(d, key)
            per_case[column] += [float(m.dice) for m in d.metrics if m.dice is not None]
            adapt[column].append(d.cost.adapt_wall_s)
    scores = {
        (key, c): Stat.of(_seed_means(by_seed.get((key, c), {}), column_tasks[c]).values())
        for key, _ in GROUP_METRICS
        for c in columns
    }
    costs = [d.cost for d in own]
    return MethodSummary(
        label=label, scores=scores, by_seed=by_seed, per_case={c: tuple(v) for c, v in per_case.items()},
        trainable_params=int(np.mean([c.trainable_params for c in costs])),
        adapter_bytes=float(np.mean([c.adapter_bytes for c in costs])),
        peak_memory_bytes=float(max(c.peak_memory_bytes for c in costs)), memory_kind=costs[0].memory_kind,
        adapt_s={c: float(np.mean(v)) for c, v in adapt.items() if v},
        mean_adapt_s=float(np.mean([c.adapt_wall_s for c in costs])),
    )  # fmt: skip


def curves(summary: GroupSummary) -> dict[str, dict[int, tuple[float, float]]]:
    """Method -> k -> (mean, std) Dice over seeds, numeric ``k`` only (for the Dice-vs-k panel)."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for row in summary.methods:
        for column in summary.columns:
            stat = row.scores[("dice", column)]
            if column.isdigit() and stat.n:
                out.setdefault(row.label, {})[int(column)] = (stat.mean, 0.0 if math.isnan(stat.std) else stat.std)
    return out


def format_bytes(n: float) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def context(cells: Sequence[CellResult]) -> dict[str, Any]:
    """Facts shared by the cells: machines, devices, total and adaptation wall time."""
    timed = [d.cost.cell_wall_s for d in cells if d.cost.cell_wall_s is not None]
    return {
        "machines": sorted({d.cost.machine for d in cells if d.cost.machine}),
        "devices": sorted({d.cost.device for d in cells}),
        "cell_wall_s": float(sum(timed)) if timed else None,
        "timed_cells": len(timed),
        "adapt_wall_s": float(sum(d.cost.adapt_wall_s for d in cells)),
        "seeds": sorted({d.cell.seed for d in cells}),
    }


__all__ = [
    "GROUP_METRICS",
    "GroupSummary",
    "MethodSummary",
    "Stat",
    "cell_columns",
    "cell_mean",
    "context",
    "curves",
    "format_bytes",
    "groups",
    "incomplete_note",
    "method_labels",
    "summarise_group",
]
