"""The FSEFT benchmark: the paper's protocol as data, a resumable sharded grid runner, paper-style tables.

Public API: :func:`load_protocol` / :func:`parse_protocol` (:class:`Protocol`), :func:`plan`
(:class:`Plan`, :class:`Cell`), :func:`run_benchmark` (:class:`BenchmarkResult`), :func:`run_cells`,
:func:`read_cells` (:class:`CellResult`), :func:`merge`, :func:`write_results`, :func:`markdown`, :func:`shipped_protocols`.
"""

from .cells import CellCost, CellResult, MetricRow
from .planning import ALL, Cell, Plan, TaskCases, plan, shard
from .protocol import (
    BuildSpec,
    DataSpec,
    MethodSpec,
    ModelSpec,
    Protocol,
    SourceSpec,
    TaskSpec,
    load_protocol,
    parse_protocol,
    shipped_protocol,
    shipped_protocols,
)
from .runner import BenchmarkResult, CellEvent, merge, read_cells, run_benchmark, run_cells, write_results
from .tables import markdown, per_case_rows, per_seed_rows

__all__ = [
    "ALL",
    "BenchmarkResult",
    "BuildSpec",
    "Cell",
    "CellCost",
    "CellEvent",
    "CellResult",
    "DataSpec",
    "MethodSpec",
    "MetricRow",
    "ModelSpec",
    "Plan",
    "Protocol",
    "SourceSpec",
    "TaskCases",
    "TaskSpec",
    "load_protocol",
    "markdown",
    "merge",
    "parse_protocol",
    "per_case_rows",
    "per_seed_rows",
    "plan",
    "read_cells",
    "run_benchmark",
    "run_cells",
    "shard",
    "shipped_protocol",
    "shipped_protocols",
    "write_results",
]
