"""A benchmark cell's result, typed: what the runner writes to ``OUT/cells/<cell id>.json`` and the
tables read. The JSON shape is unchanged, so cells written before still resume and tabulate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .planning import Cell

CELL_FORMAT = "fseft-benchmark-cell"
#: Metric columns of a :class:`MetricRow` that tables aggregate.
SCORES = ("dice", "hd95_mm", "nsd")


@dataclass(frozen=True)
class MetricRow:
    """Scores of one (query case, structure); a metric that is not finite is None.

    Args:
        case: Query case id.
        structure: Target structure.
        dice: Dice.
        hd95_mm: 95th percentile Hausdorff distance in mm.
        nsd: Normalised surface Dice at the protocol's tolerance.
        vol_pred_ml: Predicted volume in ml.
        vol_gt_ml: Reference volume in ml.
        flag: ``""``, or why a metric is undefined (:class:`~fseft.evaluation.metrics.StructureMetrics`).
    """

    case: str
    structure: str
    dice: float | None
    hd95_mm: float | None
    nsd: float | None
    vol_pred_ml: float | None
    vol_gt_ml: float | None
    flag: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CellCost:
    """What a cell's adaptation cost.

    Args:
        trainable_params: Parameters that trained.
        adapter_bytes: Size of the adapter file.
        peak_memory_bytes: Peak memory of the adaptation.
        memory_kind: What ``peak_memory_bytes`` measures.
        adapt_wall_s: Adaptation wall time.
        device: Where it ran.
        cell_wall_s: Wall time of the whole cell (adaptation, prediction and scoring of the queries).
        machine: The machine in one line (processor, cores, memory, accelerator).
    """

    trainable_params: int
    adapter_bytes: int
    peak_memory_bytes: int
    memory_kind: str
    adapt_wall_s: float
    device: str
    cell_wall_s: float | None = None
    machine: str = ""


@dataclass(frozen=True)
class CellResult:
    """One finished cell.

    Args:
        cell: The grid point.
        method: The method's registry name.
        decoder: The decoder policy.
        transductive: Constrained transductive inference was on.
        k_independent: The method trains nothing, so one cell stands for every ``k``.
        config_hash: Hash of everything that determines the result (checked on resume).
        config: That configuration.
        record: The adaptation record (with the transductive priors and reports when on).
        cost: The adaptation's cost.
        metrics: One row per (query case, structure).
    """

    cell: Cell
    method: str
    decoder: str
    transductive: bool
    k_independent: bool
    config_hash: str
    config: dict[str, Any]
    record: dict[str, Any]
    cost: CellCost
    metrics: tuple[MetricRow, ...]

    @property
    def cell_id(self) -> str:
        """The cell's identifier (its file name)."""
        return self.cell.cell_id

    def to_dict(self) -> dict[str, Any]:
        """The cell file's JSON content."""
        c = self.cell
        return {
            "format": CELL_FORMAT,
            "cell": {**dataclasses.asdict(c), "column": c.column, "cell_id": c.cell_id, "method": self.method,
                     "decoder": self.decoder, "transductive": self.transductive, "k_independent": self.k_independent},
            "config_hash": self.config_hash,
            "config": self.config,
            "record": self.record,
            "cost": dataclasses.asdict(self.cost),
            "metrics": [m.to_dict() for m in self.metrics],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> CellResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            DataError: naming ``where`` for a file that is not a cell result.
        """
        if not isinstance(data, dict) or data.get("format") != CELL_FORMAT:
            raise DataError(f"{where}: not a benchmark cell file")
        try:
            c = data["cell"]
            cell = Cell(**{f.name: c[f.name] for f in dataclasses.fields(Cell)})
            return cls(
                cell=cell, method=c["method"], decoder=c["decoder"], transductive=bool(c["transductive"]),
                k_independent=bool(c.get("k_independent", False)), config_hash=data["config_hash"],
                config=data["config"], record=data["record"], cost=CellCost(**data["cost"]),
                metrics=tuple(MetricRow(**m) for m in data["metrics"]),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: unreadable benchmark cell ({e})") from None


__all__ = ["CELL_FORMAT", "SCORES", "CellCost", "CellResult", "MetricRow"]
