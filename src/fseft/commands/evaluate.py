"""``fseft evaluate PRED GT``: Dice, HD95, NSD and volume errors of predictions against references."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from ..anatomy import get_template
from ..data.io import image_suffix
from ..data.manifests import load_manifest
from ..errors import ConfigError, DataError
from ..evaluation import SummaryRow, summarize, to_csv, to_json
from ..evaluation.files import (
    LABELS_JSON,
    case_name,
    dicom_labels,
    evaluate_manifest_case,
    evaluate_pair,
    is_dicom_side,
    label_files,
    manifest_structures,
    pair_files,
    parse_labels,
    read_labels_json,
    select_structures,
)
from ..evaluation.metrics import StructureMetrics
from ..io_utils import atomic_path
from ..outputs import plan_outputs

#: Output file names inside ``--out``.
PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "metrics_summary.csv"
METRICS_JSON = "metrics.json"
_MANIFEST_FILES = ("dataset.json", "cases.csv")


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``fseft evaluate`` was asked to do.

    Args:
        pred: Prediction label map, or a folder of them.
        gt: Reference label map, a folder of them, or a dataset manifest.
        labels: Label value -> structure JSON (file or inline object) for inputs without ``labels.json``.
        template: Dataset template naming the label values of inputs without ``labels.json``.
        structures: Structures to evaluate (default: every one both sides name).
        tolerance_mm: NSD tolerance in mm.
        out: Folder for the CSV and JSON outputs (none written when ``None``).
        overwrite: Replace existing outputs.
    """

    pred: Path
    gt: Path
    labels: str | None = None
    template: str | None = None
    structures: tuple[str, ...] | None = None
    tolerance_mm: float = 2.0
    out: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.tolerance_mm) or self.tolerance_mm < 0:
            raise ConfigError(f"--tolerance-mm must be a finite number >= 0, got {self.tolerance_mm}")
        if self.structures is not None and not self.structures:
            raise ConfigError("--structures is empty")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted label maps against reference labels (Dice, HD95, NSD, volumes)",
        description="Score predicted label maps against references: Dice, 95th-percentile Hausdorff "
        "distance (mm), normalised surface Dice at a tolerance (mm) and volume errors, per case and "
        "structure, with per-structure mean/std/median. PRED and GT are files or folders (paired by "
        "case name = file name without .nii/.nii.gz), or GT is a dataset manifest (cases matched by "
        f"case id). Label names come from a {LABELS_JSON} beside the inputs (as written by "
        "'fseft predict'), else from --labels or --template. Either side may be a DICOM-SEG or RT "
        "Structure Set (.dcm, names from the file), placed on the other side's grid. Predictions are "
        "never resampled: they must be on the reference grid.",
    )
    parser.add_argument(
        "pred", type=Path, metavar="PRED", help="prediction label map, DICOM-SEG / RTSTRUCT (.dcm), or folder"
    )
    parser.add_argument(
        "gt", type=Path, metavar="GT", help="reference label map, DICOM-SEG / RTSTRUCT (.dcm), folder, or manifest"
    )
    names = parser.add_mutually_exclusive_group()
    names.add_argument(
        "--labels",
        metavar="JSON",
        help=f'label value -> structure, a JSON file or inline object like \'{{"1": "liver"}}\', '
        f"for inputs without {LABELS_JSON}",
    )
    names.add_argument(
        "--template",
        metavar="NAME",
        help=f"dataset template naming the label values of inputs without {LABELS_JSON}",
    )
    parser.add_argument(
        "--structures", metavar="A,B", help="comma-separated structures to evaluate (default: all shared)"
    )
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default: 2)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"write {PER_CASE_CSV}, {SUMMARY_CSV} and {METRICS_JSON} here",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = EvaluateConfig(
        pred=args.pred,
        gt=args.gt,
        labels=args.labels,
        template=args.template,
        structures=tuple(s.strip() for s in args.structures.split(",") if s.strip())
        if args.structures
        else None,
        tolerance_mm=args.tolerance_mm,
        out=args.out,
        overwrite=args.overwrite,
    )
    return evaluate(cfg, Console())


def evaluate(cfg: EvaluateConfig, console: Console) -> int:
    """Run the evaluation, write the outputs (all or none), print the summary table."""
    targets = _output_paths(cfg)
    fallback = _fallback_labels(cfg)
    pred_labels = _side_labels(cfg.pred, fallback, "PRED")
    if _is_manifest(cfg.gt):
        rows, no_gt, no_pred = _evaluate_manifest(cfg, pred_labels)
    else:
        rows, no_gt, no_pred = _evaluate_files(cfg, pred_labels, _side_labels(cfg.gt, fallback, "GT"))
    for what, cases in (
        ("predictions without a reference", no_gt),
        ("references without a prediction", no_pred),
    ):
        if cases:
            console.print(f"[yellow]{len(cases)} {what}:[/] {', '.join(cases)}")
    summary = summarize(rows)
    if targets:
        document = to_json(
            rows,
            summary,
            pred=str(cfg.pred),
            gt=str(cfg.gt),
            tolerance_mm=cfg.tolerance_mm,
            unmatched_predictions=no_gt,
            unmatched_references=no_pred,
        )
        try:
            with contextlib.ExitStack() as stack:  # every file appears, or none does
                tmp = {name: stack.enter_context(atomic_path(path)) for name, path in targets.items()}
                tmp[PER_CASE_CSV].write_text(
                    to_csv(rows, [f.name for f in fields(StructureMetrics)]), encoding="utf-8"
                )
                tmp[SUMMARY_CSV].write_text(
                    to_csv(summary, [f.name for f in fields(SummaryRow)]), encoding="utf-8"
                )
                tmp[METRICS_JSON].write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{cfg.out}: cannot write the outputs ({e.strerror or e})") from e
    console.print(_table(summary, cfg.tolerance_mm, len({r.case for r in rows})))
    if targets:
        console.print(f"wrote {', '.join(str(p) for p in targets.values())}")
    return 0


def _output_paths(cfg: EvaluateConfig) -> dict[str, Path]:
    if cfg.out is None:
        return {}
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ConfigError(f"{cfg.out}: --out must be a folder, not a file")
    targets = {name: cfg.out / name for name in (PER_CASE_CSV, SUMMARY_CSV, METRICS_JSON)}
    plan_outputs(targets.values(), overwrite=cfg.overwrite)
    return targets


def _fallback_labels(cfg: EvaluateConfig) -> dict[int, str] | None:
    if cfg.labels is not None:
        if cfg.labels.lstrip().startswith("{"):
            try:
                return parse_labels(json.loads(cfg.labels), "--labels")
            except json.JSONDecodeError as e:
                raise ConfigError(f"--labels: not valid JSON ({e})") from None
        return read_labels_json(cfg.labels)
    if cfg.template is not None:
        template = get_template(cfg.template)
        if template.layout != "labelmap":
            raise ConfigError(f"template {template.name!r} describes mask files, not label values")
        return dict(template.labels)
    return None


def _side_labels(path: Path, fallback: dict[int, str] | None, what: str) -> dict[int, str]:
    """DICOM objects name their structures; else ``labels.json`` in the input folder (or beside the input
    file) wins over --labels/--template."""
    if is_dicom_side(path):
        return dicom_labels(path)
    folder = path if path.is_dir() else path.parent
    if (folder / LABELS_JSON).is_file():
        return read_labels_json(folder / LABELS_JSON)
    if fallback is not None:
        return fallback
    raise ConfigError(f"{path}: no label names for {what}; give --labels or --template, or add {LABELS_JSON}")


def _is_manifest(gt: Path) -> bool:
    if gt.is_file():
        return image_suffix(gt) is None and not is_dicom_side(gt)
    if gt.is_dir():
        return any((gt / name).is_file() for name in _MANIFEST_FILES) or not label_files(gt)
    return False


def _evaluate_files(
    cfg: EvaluateConfig, pred_labels: dict[int, str], gt_labels: dict[int, str]
) -> tuple[list[StructureMetrics], list[str], list[str]]:
    pairs, no_gt, no_pred = pair_files(cfg.pred, cfg.gt)
    if not pairs:
        raise DataError(f"{cfg.pred}: no prediction matches a reference in {cfg.gt} by case name")
    gt_names = set(gt_labels.values())
    chosen = select_structures([n for n in pred_labels.values() if n in gt_names], cfg.structures)
    rows = []
    for pair in track(pairs, description="evaluating", transient=True):
        rows.extend(evaluate_pair(pair, pred_labels, gt_labels, chosen, cfg.tolerance_mm))
    return rows, no_gt, no_pred


def _evaluate_manifest(
    cfg: EvaluateConfig, pred_labels: dict[int, str]
) -> tuple[list[StructureMetrics], list[str], list[str]]:
    if not cfg.pred.exists():
        raise DataError(f"{cfg.pred}: not found")
    preds = label_files(cfg.pred) if cfg.pred.is_dir() else {case_name(cfg.pred): cfg.pred}
    cases = {c.case_id: c for c in load_manifest(cfg.gt) if c.has_label}
    matched = sorted(set(preds) & set(cases))
    if not matched:
        raise DataError(f"{cfg.pred}: no prediction matches a labelled case of {cfg.gt} by case id")
    annotated = {n for case_id in matched for n in manifest_structures(cases[case_id])}
    chosen = select_structures([n for n in pred_labels.values() if n in annotated], cfg.structures)
    rows = []
    for case_id in track(matched, description="evaluating", transient=True):
        rows.extend(
            evaluate_manifest_case(cases[case_id], preds[case_id], pred_labels, chosen, cfg.tolerance_mm)
        )
    return rows, sorted(set(preds) - set(cases)), sorted(set(cases) - set(preds))


def _table(summary: list[SummaryRow], tolerance_mm: float, n_cases: int) -> Table:
    stats = {(s.structure, s.metric): s for s in summary}
    table = Table(title=f"{n_cases} case(s); NSD at {tolerance_mm:g} mm; mean ± std (NaN skipped)")
    table.add_column("structure")
    for header in ("n", "Dice", "NSD", "HD95 mm", "|ΔV| ml"):
        table.add_column(header, justify="right")
    for structure in dict.fromkeys(s.structure for s in summary):
        dice = stats[(structure, "dice")]
        table.add_row(
            structure,
            str(dice.n + dice.n_nan),
            _cell(dice),
            _cell(stats[(structure, "nsd")]),
            _cell(stats[(structure, "hd95_mm")]),
            _cell(stats[(structure, "abs_vol_err_ml")]),
        )
    return table


def _cell(row: SummaryRow) -> str:
    text = "–" if row.n == 0 else f"{row.mean:.3g}" + ("" if math.isnan(row.std) else f" ± {row.std:.2g}")
    return text + (f" ({row.n_nan} NaN)" if row.n_nan else "")
