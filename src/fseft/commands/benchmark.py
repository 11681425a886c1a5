"""``fseft benchmark``: run a benchmark protocol (a grid of few-shot adaptations), resumably and in shards."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class BenchmarkCommandConfig:
    """What ``fseft benchmark`` was asked to do.

    Args:
        protocol: Protocol YAML or shipped protocol name (None with ``merge``).
        out: Output folder.
        shard: ``"i/n"`` or None.
        tasks: Run only these tasks' cells (empty: every task).
        seeds: Run only these seeds' cells (empty: every seed).
        support: Support-pool manifest for every task (replaces the protocol's pool).
        query: Query manifest for every task (replaces the protocol's queries).
        data_root: Folder the protocol's data paths are relative to.
        model: Model name or file replacing the protocol's.
        merge: Benchmark folders whose cells are merged into ``out`` (no computation).
    """

    protocol: str | None
    out: Path
    shard: str | None = None
    tasks: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    support: Path | None = None
    query: Path | None = None
    data_root: Path | None = None
    model: str | None = None
    merge: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.merge and (self.shard or self.tasks or self.seeds or self.support or self.query or self.data_root or self.model):
            raise ConfigError("--merge only combines finished folders; drop the run options")
        if not self.merge and self.protocol is None:
            raise ConfigError("give a PROTOCOL (a YAML file or a shipped name), or --merge DIR...")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``benchmark`` subcommand."""
    from ..protocols import shipped_protocols

    p = subparsers.add_parser(
        "benchmark",
        help="run a few-shot benchmark protocol (tasks x methods x k x seeds) and tabulate it",
        description="Run the FSEFT protocol described by a YAML file: every cell (task x method x k x seed) "
        "adapts the foundation model on a k-shot support set, predicts the query cases and scores them. "
        "Each finished cell is written to OUT/cells/ at once, so an interrupted run resumes where it "
        "stopped. Runs started on the same OUT (one per core or machine, at any time) split its remaining "
        "cells between them, each computed once; --shard i/n runs every n-th cell (shards may share OUT or "
        "be merged with --merge). "
        "Writes OUT/results_per_case.csv, OUT/results_per_seed.csv, OUT/results.md (paper-style tables: "
        "mean Dice ± std over seeds per task group, with cost columns) and OUT/report.html (one page: "
        "what was run, per-group tables with Dice, HD95, NSD and costs, Dice-vs-k, and one query case "
        f"drawn for every method and k from OUT/snapshots/). Shipped protocols: {', '.join(shipped_protocols())}.",
        epilog="Examples: fseft benchmark synthetic --out runs/synth;  fseft benchmark openkbp --data-root "
        "../shared/data/openkbp --model fm.pt --out runs/kbp --shard 1/2;  "
        "fseft benchmark --merge runs/a runs/b --out runs/all",
    )
    p.add_argument("protocol", nargs="?", metavar="PROTOCOL", help="protocol YAML or shipped protocol name")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (resumes from it)")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (1-based) of the grid")
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="NAME",
                   help="run only this task's cells (repeatable; the tables cover every cell in OUT), e.g. the "
                   "novel tasks first")  # fmt: skip
    p.add_argument("--seed", dest="seeds", type=int, action="append", default=[], metavar="S",
                   help="run only this seed's cells (repeatable)")  # fmt: skip
    p.add_argument("--support", type=Path, metavar="MANIFEST",
                   help="support-pool manifest for every task (the queries stay the protocol's unless --query)")
    p.add_argument("--query", type=Path, metavar="MANIFEST",
                   help="query manifest for every task, e.g. another folder's OpenKBP cases.csv (the support "
                   "pool stays where the protocol says unless --support)")  # fmt: skip
    p.add_argument("--data-root", type=Path, metavar="DIR",
                   help="folder the protocol's manifests are relative to (synthetic: where the assembly is "
                   "generated; default OUT/data)")  # fmt: skip
    p.add_argument("--model", metavar="NAME_OR_FILE", help="foundation model replacing the protocol's")
    p.add_argument("--merge", type=Path, nargs="+", default=(), metavar="DIR",
                   help="merge the cells of these benchmark folders into --out and tabulate them")  # fmt: skip
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> BenchmarkCommandConfig:
    return BenchmarkCommandConfig(
        protocol=args.protocol,
        out=args.out,
        shard=args.shard,
        tasks=tuple(args.tasks),
        seeds=tuple(args.seeds),
        support=args.support,
        query=args.query,
        data_root=args.data_root,
        model=args.model,
        merge=tuple(args.merge),
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..benchmark import load_protocol, merge, run_benchmark, write_results
    from ..outputs import plan_outputs

    cfg = _config(args)
    plan_outputs(folders=[cfg.out])  # a run resumes from what the folder holds
    console = Console()
    if cfg.merge:
        protocol = load_protocol(cfg.protocol) if cfg.protocol else None
        cells = merge(cfg.merge, cfg.out)
        outputs = write_results(cells, cfg.out, protocol)
        console.print(f"merged {len(cells)} cells from {len(cfg.merge)} folders into {cfg.out}")
        show_outputs(console, outputs)
        return 0
    with CellProgress(console) as progress:
        result = run_benchmark(cfg.protocol, cfg.out, data_root=cfg.data_root, model=cfg.model,  # type: ignore[arg-type]
                               support=cfg.support, query=cfg.query, shard_spec=cfg.shard, tasks=cfg.tasks,
                               seeds=cfg.seeds,
                               on_cell=progress.on_cell, on_epoch=progress.on_epoch)  # fmt: skip
    show_outputs(console, result.outputs)
    done, total = len(result.cells), len(result.plan.cells)
    if not result.complete:
        console.print(f"[yellow]{done} of {total} cells done; the tables cover those "
                      "(run the other shards, or wait for the runs still computing theirs)")  # fmt: skip
    return 0


def show_outputs(console: Any, outputs: dict[str, Path]) -> None:
    """Print the Markdown tables and where every output is."""
    from rich.markdown import Markdown

    console.print(Markdown(outputs["tables"].read_text(encoding="utf-8")))
    console.print(f"per-case results: {outputs['per_case']}")
    console.print(f"tables:           {outputs['tables']}")
    console.print(f"HTML report:      {outputs['report']}")


class CellProgress:
    """Rich progress: one bar over the grid's cells, one over the current cell's training epochs."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)  # fmt: skip
        self.cells: Any = None
        self.epochs: Any = None

    def __enter__(self) -> CellProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def on_cell(self, event: Any) -> None:
        """Advance the grid bar (``CellEvent``)."""
        if self.cells is None:
            self.cells = self.bar.add_task("cells", total=event.total, info="")
        cell = event.cell
        name = f"{cell.task} · {cell.label} · k={cell.column} · seed {cell.seed}"
        if event.stage == "start":
            self.bar.update(self.cells, info=name)
            if self.epochs is not None:
                self.bar.remove_task(self.epochs)
                self.epochs = None
        else:
            status = {"cached": "cached", "claimed": "another run is computing it"}.get(event.stage, f"{event.seconds:.0f} s")
            self.bar.update(self.cells, completed=event.index + 1, info=f"{name}: {status}")

    def on_epoch(self, report: Any) -> None:
        """Show the current cell's training (``EpochReport``)."""
        if self.epochs is None:
            self.epochs = self.bar.add_task("  epochs", total=report.total, info="")
        label = "  caching features" if report.stage == "features" else "  training"
        info = "" if report.stage == "features" else f"loss {report.loss:.4f}"
        self.bar.update(self.epochs, description=label, total=report.total, completed=report.epoch, info=info)
