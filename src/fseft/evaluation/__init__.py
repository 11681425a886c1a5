"""Segmentation metrics (Dice, HD95, NSD, volume errors), their aggregation, and file evaluation."""

from .aggregate import METRICS, SummaryRow, summarize, to_csv, to_json
from .files import (
    EvalPair,
    evaluate_files,
    evaluate_manifest_case,
    evaluate_pair,
    pair_files,
    read_labels_json,
)
from .metrics import BOTH_EMPTY, FP_ONLY, MISSED, StructureMetrics, evaluate_case, evaluate_masks

__all__ = [
    "BOTH_EMPTY",
    "FP_ONLY",
    "METRICS",
    "MISSED",
    "EvalPair",
    "StructureMetrics",
    "SummaryRow",
    "evaluate_case",
    "evaluate_files",
    "evaluate_manifest_case",
    "evaluate_masks",
    "evaluate_pair",
    "pair_files",
    "read_labels_json",
    "summarize",
    "to_csv",
    "to_json",
]
