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
    p_info = actions.add_parser(
        "info", help="everything known about one checkpoint or bundled model (recipe, measured Dice)"
    )
    p_info.add_argument("name", metavar="NAME", help="checkpoint or bundled model name (see 'fseft zoo list')")
    p_dl = actions.add_parser(
        "download", help="download one checkpoint (resumes a partial download, verifies size and sha256 when known)"
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
    elif args.zoo_action == "info" and args.name in _bundled_names():
        _bundled_info(console, args.name)
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
        verified = {"sha256": "sha256 verified", "size": "size verified (no sha256 known: content not verified)",
                    "unpinned": "unpinned: no size or sha256 known, integrity not verified"}[entry.pinned]  # fmt: skip
        console.print(f"{path} ({verified})")
    return 0


def _bundled_names() -> list[str]:
    from ..models.bundled_models import register_bundled

    return register_bundled()


def _bundled_info(console: Console, name: str) -> None:
    """Recipe, training cost and measured accuracy of a bundled model."""
    from ..models.bundled_models import recipe

    info = recipe(name)
    wall = info.get("wall_time_s")
    rows = [
        ("name", name),
        ("description", info.get("description", "")),
        ("structures", ", ".join(info.get("structures", []))),
        ("training", f"{info.get('steps')} steps"
         + (f", {wall / 3600:.2f} h wall time" if wall else "") + (f" on {info['machine']}" if info.get("machine") else "")),
        ("commit", info.get("commit", "unknown")),
        ("sha256", info.get("sha256", "unknown")),
        *[("command", c) for c in info.get("commands", [])],
    ]  # fmt: skip
    table = Table(show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    evaluation = info.get("evaluation") or {}
    val = info.get("validation_dice") or {}
    scores = Table(title=f"{name}: accuracy per structure")
    scores.add_column("structure")
    scores.add_column("val Dice (model grid, end of training)", justify="right")
    if evaluation:
        for col in ("Dice", "HD95 mm", "NSD 2 mm"):
            scores.add_column(f"{col} ({evaluation['cases']} held-out cases, input grid)", justify="right")
    metrics = evaluation.get("metrics", {})
    for s in info.get("structures", []):
        row = [s, f"{val[s]:.3f}" if s in val else "-"]
        if evaluation:
            m = metrics.get(s)
            row += [f"{m['dice']:.3f} ± {m['dice_std']:.3f}", f"{m['hd95']:.1f}", f"{m['nsd']:.3f}"] if m else ["-"] * 3
        scores.add_row(*row)
    console.print(scores)
    if evaluation:
        console.print(f"held-out mean Dice {evaluation['mean_dice']:.3f}; "
                      f"prediction {evaluation['predict_seconds_per_volume']} s/volume ({evaluation.get('machine', '')})")  # fmt: skip
    curve = info.get("learning_curve") or []
    if curve:
        points = ", ".join(f"{p['elapsed_s'] / 3600:.2f} h: {p['val_mean']:.3f}" for p in curve if p.get("elapsed_s"))
        console.print(f"learning curve (training hours: mean validation Dice): {points}")


def _list(console: Console, cache_dir: Path | None) -> None:
    from ..models import MODELS, zoo
    from ..models.bundled_models import recipe

    table = Table(title="public checkpoints (fseft zoo)")
    table.add_column("name", no_wrap=True)
    for col in ("arch", "head", "merging", "pinned", "cached"):
        table.add_column(col, overflow="fold")
    for name in zoo.ZOO.names():
        e = zoo.get_entry(name)
        table.add_row(
            name,
            f"{e.arch} {e.feature_size}",
            f"{len(e.structures)} structures" if e.structures else "none",
            e.swin_merging or "-",
            e.pinned,
            "yes" if zoo.cached_path(name, cache_dir).is_file() else "no",
        )
    console.print(table)
    bundled = Table(title="bundled models (in the package, no download)")
    for col in ("name", "structures", "held-out Dice", "description"):
        bundled.add_column(col, overflow="fold", no_wrap=col == "name")
    for name in _bundled_names():
        info = recipe(name)
        evaluation = info.get("evaluation") or {}
        dice = f"{evaluation['mean_dice']:.3f} ({evaluation['cases']} cases)" if evaluation else "-"
        bundled.add_row(name, str(len(info.get("structures", []))), dice, info.get("description", ""))
    console.print(bundled)
    console.print("details: fseft zoo info NAME; 'unpinned': no size or sha256 is known, downloads are "
                  "checked for completeness only")
    others = [n for n in MODELS.names() if n not in _bundled_names()]
    if others:
        console.print("other registered models: " + ", ".join(others))


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
        ("size", f"{entry.size} bytes" if entry.size else "unknown (unpinned)"),
        ("patch merging", "MONAI v0.9 (legacy), the one the weights were trained with"
         if entry.swin_merging == "legacy" else entry.swin_merging or "-"),  # fmt: skip
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
