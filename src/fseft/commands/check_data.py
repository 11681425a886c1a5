"""``fseft check-data``: verify a dataset's files before training on them."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._progress import progress_bar

_STYLE = {"error": "bold red", "warning": "yellow"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``check-data`` subcommand."""
    parser = subparsers.add_parser(
        "check-data",
        help="check a dataset's images and labels for problems before using them",
        description="Read every image and label of a manifest and report, one line per problem naming the "
        "file: missing, unreadable or truncated files, NaN/inf voxels, singular affines, voxel spacings outside "
        "the plausible CT range (0.1-20 mm, FSEFT_SPACING_RANGE), label grids that do not match their image "
        "(errors) or must be resampled (warnings), label values unknown to the template, empty labels, "
        "declared structures with empty masks, duplicate cases, implausible HU ranges (warnings). "
        "Exit code 0 when there are no errors (no warnings either with --strict).",
    )
    parser.add_argument(
        "manifest",
        type=Path,
        metavar="MANIFEST",
        help="CSV, dataset.json, OpenKBP cases.csv or TotalSegmentator folder",
    )
    parser.add_argument(
        "--template",
        default=None,
        metavar="NAME",
        help="dataset template for every label (overrides the manifest's)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the report as JSON to OUT"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--strict", action="store_true", help="fail on warnings too")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the manifest, print the problems table and summary; 0 only when the check passes."""
    from ..data.check import check_manifest
    from ..io_utils import write_json_atomic
    from ..outputs import plan_outputs

    if args.json is not None:
        plan_outputs([args.json], overwrite=args.overwrite)
    console = Console()
    with progress_bar(console) as progress:
        task = progress.add_task("checking", total=None)
        report = check_manifest(
            args.manifest,
            template=args.template,
            on_case=lambda case: progress.update(task, advance=1, description=f"checking {case.case_id}"),
        )
    if report.problems:
        if not console.is_terminal:  # keep each problem on one line in logs and pipes
            console.width = max(120, max(len(p.line()) for p in report.problems) + 20)
        table = Table(title=f"fseft check-data {escape(str(args.manifest))}")
        table.add_column("case", no_wrap=True)
        table.add_column("severity", no_wrap=True)
        table.add_column("problem")
        for p in report.problems:
            table.add_row(
                escape(p.case_id), f"[{_STYLE[p.severity]}]{p.severity}[/]", escape(f"{p.path}: {p.message}")
            )
        console.print(table)
    passed = report.passed(strict=args.strict)
    verdict = "[bold green]passed[/]" if passed else "[bold red]failed[/]"
    console.print(f"{escape(report.summary())}{' (strict)' if args.strict else ''}: {verdict}")
    if args.json is not None:
        write_json_atomic(args.json, {**report.to_dict(), "strict": args.strict, "passed": passed})
        console.print(f"report written to {escape(str(args.json))}")
    return 0 if passed else 1
