"""``fseft report --eval DIR --out report.html``: a self-contained HTML report of an evaluation or benchmark."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report (tables, box plots, overlays, Dice-vs-k curves)",
        description="Write one self-contained HTML file (figures embedded, no external resources) from "
        "the output folder of 'fseft evaluate' (summary table, per-structure Dice and HD95 box plots, "
        "per-case table) and/or a benchmark results CSV (columns method, k, seed, structure, dice: "
        "Dice-vs-k curves per method, mean ± std over seeds). Cases are drawn as axial, coronal and "
        "sagittal slices through each structure's centroid with the reference and prediction outlined; "
        "the predictions and references default to those recorded by 'fseft evaluate'.",
        epilog="Example: fseft report --eval metrics/ --images scans/ --out report.html",
    )
    parser.add_argument(
        "--eval", dest="evaluation", type=Path, metavar="DIR", help="'fseft evaluate --out' folder"
    )
    parser.add_argument("--benchmark", type=Path, metavar="CSV", help="benchmark results CSV")
    parser.add_argument(
        "--pred", type=Path, metavar="DIR", help="predictions to draw (default: the evaluated ones)"
    )
    parser.add_argument(
        "--gt",
        type=Path,
        metavar="PATH",
        help="references: manifest or label-map folder (default: the evaluated ones)",
    )
    parser.add_argument(
        "--images", type=Path, metavar="DIR", help="CT images named by case (unless --gt is a manifest)"
    )
    parser.add_argument("--gt-template", metavar="NAME", help="template naming the reference label values")
    parser.add_argument(
        "--max-cases", type=int, default=4, help="cases drawn, worst mean Dice first (default 4; 0: none)"
    )
    parser.add_argument("--title", default="Segmentation report", help="page title")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="HTML", help="report file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Collect the cases to draw and write the report."""
    from rich.console import Console

    from ..errors import ConfigError
    from ..outputs import plan_outputs
    from ..report import build_report, find_overlay_cases

    plan_outputs([args.out], overwrite=args.overwrite)
    if args.max_cases < 0:
        raise ConfigError(f"--max-cases must be >= 0, got {args.max_cases}")
    recorded, ranking = _recorded(args.evaluation)
    pred = args.pred or recorded.get("pred")
    gt = args.gt or recorded.get("gt")
    overlays = []
    if pred is not None and args.max_cases > 0:
        found = find_overlay_cases(pred, gt, images=args.images, gt_template=args.gt_template)
        found.sort(key=lambda c: ranking.get(c.case, math.inf))
        overlays = found[: args.max_cases]
    console = Console(stderr=True)
    with console.status("drawing the report"):
        path = build_report(
            args.evaluation, args.benchmark, overlays, args.out, title=args.title, overwrite=args.overwrite
        )
    console.print(f"wrote {path} ({len(overlays)} case(s) drawn)")
    return 0


def _recorded(evaluation: Path | None) -> tuple[dict[str, Path], dict[str, float]]:
    """Paths recorded in ``metrics.json`` (when they still exist) and each case's mean Dice."""
    if evaluation is None or not (evaluation / "metrics.json").is_file():
        return {}, {}
    try:
        doc = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}, {}
    paths = {k: Path(doc[k]) for k in ("pred", "gt") if isinstance(doc.get(k), str) and Path(doc[k]).exists()}
    dice: dict[str, list[float]] = {}
    for row in doc.get("cases", []):
        if isinstance(row.get("dice"), (int, float)):
            dice.setdefault(str(row["case"]), []).append(float(row["dice"]))
    return paths, {case: sum(v) / len(v) for case, v in dice.items()}
