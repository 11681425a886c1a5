"""Each few-shot number beside its own family's ceiling.

A row's *family* is its method and decoder policy: ``spatial-adapter +TI`` and ``spatial-adapter``
share one, ``lora (decoder fine-tuned)`` and ``lora`` do not. The family's ceiling is the
``all`` column (trained on the whole support pool) of the first row of the family, in protocol
order, that has all-train cells; the tables show it under ``all`` for the family's other rows (in
parentheses) and the gap between the largest ``k`` and it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cells import CellResult


def family(cell: CellResult) -> tuple[str, str]:
    """The family of a cell's row: ``(method, decoder policy)``."""
    return cell.method, cell.decoder


def ceiling_rows(cells: Sequence[CellResult]) -> dict[str, str]:
    """Row label -> the label of the row holding its family's all-train ceiling (rows of families
    without all-train cells are left out)."""
    ordered = sorted(cells, key=lambda d: d.cell.method_index)
    owners: dict[tuple[str, str], str] = {}
    for d in ordered:
        if d.cell.all_train:
            owners.setdefault(family(d), d.cell.label)
    return {d.cell.label: owners[family(d)] for d in ordered if family(d) in owners}


__all__ = ["ceiling_rows", "family"]
