"""``fseft zoo``: list, describe and download public pretrained checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``zoo`` subcommand."""
    parser = subparsers.add_parser(
        "zoo",
        help="list, describe and download public pretrained checkpoints",
        description="Public pretrained checkpoints usable as foundation models (the paper's FSEFT model, "
        "CLIP-Driven, SuPreM, MONAI Swin UNETR). Files are cached in --cache-dir "
        "(default $FSEFT_CACHE or ~/.cache/fseft); load one with fseft.models.load_model(NAME).",
    )
    actions = parser.add_subparsers(dest="zoo_action", metavar="ACTION", required=True)
    p_list = actions.add_parser("list", help="table of checkpoints and whether they are cached")
    p_info = actions.add_parser("info", help="everything known about one checkpoint")
    p_info.add_argument("name", metavar="NAME", help="checkpoint name (see 'fseft zoo list')")
    p_dl = actions.add_parser(
        "download", help="download one checkpoint (resumes a partial download, verifies sha256 when known)"
    )
    p_dl.add_argument("name", metavar="NAME", help="checkpoint name (see 'fseft zoo list')")
    for p in (p_list, p_info, p_dl):
        p.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help="cache directory (default $FSEFT_CACHE or ~/.cache/fseft)",
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``list`` / ``info`` / ``download``."""
    from ..models import zoo

    console = Console()
    if args.zoo_action == "list":
        _list(console, args.cache_dir)
    elif args.zoo_action == "info":
        _info(console, zoo.get_entry(args.name), args.cache_dir)
    else:
        entry = zoo.get_entry(args.name)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(entry.name, total=None)
            path = zoo.download_entry(
                entry.name,
                args.cache_dir,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        verified = "sha256 verified" if entry.sha256 else "no published sha256: integrity not verified"
        console.print(f"{path} ({verified})")
    return 0


def _list(console: Console, cache_dir: Path | None) -> None:
    from ..models import MODELS, zoo

    table = Table(title="public checkpoints (fseft zoo)")
    table.add_column("name", no_wrap=True)
    for col in ("arch", "head", "sha256", "cached"):
        table.add_column(col, overflow="fold")
    for name in zoo.ZOO.names():
        e = zoo.get_entry(name)
        table.add_row(
            name,
            f"{e.arch} {e.feature_size}",
            f"{len(e.structures)} structures" if e.structures else "none",
            "yes" if e.sha256 else "unknown",
            "yes" if zoo.cached_path(name, cache_dir).is_file() else "no",
        )
    console.print(table)
    console.print("details: fseft zoo info NAME")
    if len(MODELS):
        console.print("registered models: " + ", ".join(MODELS.names()))


def _info(console: Console, entry, cache_dir: Path | None) -> None:  # noqa: ANN001 - ZooEntry, imported lazily
    from ..models import zoo

    path = zoo.cached_path(entry.name, cache_dir)
    pre = entry.preprocess
    rows = [
        ("name", entry.name),
        ("description", entry.description),
        ("backbone", f"{entry.arch}, feature_size {entry.feature_size}"),
        ("key layout", entry.layout),
        ("url", entry.url),
        ("published at", entry.page),
        ("sha256", entry.sha256 or "unknown: no checksum is published; downloads are not integrity-checked"),
        (
            "head",
            ", ".join(s or "background" for s in entry.label_template)
            or "none (new head for your structures)",
        ),
        ("preprocessing", f"spacing {pre.spacing} mm, HU window {pre.hu_window}, ROI {pre.roi}"),
        ("cache", f"{path} ({'downloaded' if path.is_file() else 'not downloaded'})"),
        ("cite", entry.citation),
    ]
    table = Table(show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
