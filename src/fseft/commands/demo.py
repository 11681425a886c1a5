"""``fseft demo``: the whole few-shot pipeline on the embedded synthetic default, in minutes on a CPU."""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

#: ``--quick``: tiny synthetic volumes, k = 1, two epochs (a smoke test of the pipeline).
QUICK_CASES = 12
QUICK_EPOCHS = 2


@dataclass(frozen=True)
class DemoConfig:
    """What ``fseft demo`` was asked to do.

    Args:
        out: Output folder (synthetic data in ``OUT/data``, benchmark outputs in ``OUT``).
        quick: Tiny volumes, k = 1 and two epochs instead of the demo protocol's settings.
        model: Model name or file replacing the bundled default.
    """

    out: Path
    quick: bool = False
    model: str | None = None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="run the few-shot pipeline end to end on synthetic data (no data or GPU needed)",
        description="Generate the synthetic multi-site CT assembly, adapt the bundled foundation model to "
        "the shifted target site with zero-shot, linear-probe, spatial-adapter, LoRA and full fine-tuning "
        "at k = 1 and 5 on one base structure (liver) and one novel structure (duodenum), score the "
        "queries, print the table of measured Dice and write an HTML report (the demo protocol, "
        "src/fseft/protocols/demo.yaml). Interrupted? Run it again: finished cells are kept.",
    )
    p.add_argument("--out", type=Path, default=Path("fseft-demo"), metavar="DIR",
                   help="output folder (default ./fseft-demo)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help=f"tiny volumes ({QUICK_CASES} cases), k = 1, {QUICK_EPOCHS} epochs: a smoke test")  # fmt: skip
    p.add_argument("--model", metavar="NAME_OR_FILE", help="foundation model (default: the bundled one)")
    p.set_defaults(func=run)


def demo_protocol(quick: bool) -> object:
    """The shipped demo protocol; with ``quick``, on tiny volumes with k = 1 and two epochs."""
    from ..benchmark import load_protocol

    protocol = load_protocol("demo")
    if not quick:
        return protocol
    data = dataclasses.replace(protocol.data, synth_preset="tiny", synth_cases=QUICK_CASES, query_count=2)
    train = {**protocol.train, "max_epochs": QUICK_EPOCHS}
    return dataclasses.replace(protocol, name="demo-quick", data=data, k=(1,), train=train)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..benchmark import run_benchmark
    from ..models import model_or_default
    from ..outputs import plan_outputs
    from .benchmark import CellProgress, show_outputs

    cfg = DemoConfig(out=args.out, quick=args.quick, model=args.model)
    plan_outputs(folders=[cfg.out])  # an interrupted demo resumes from what the folder holds
    model_or_default(cfg.model)  # a missing bundled model fails here, before anything runs
    console = Console()
    protocol = demo_protocol(cfg.quick)
    console.print(f"fseft demo: {protocol.description.strip()}")  # type: ignore[attr-defined]
    start, cpu = time.perf_counter(), time.process_time()
    with CellProgress(console) as progress:
        result = run_benchmark(protocol, cfg.out, model=cfg.model, on_cell=progress.on_cell,
                               on_epoch=progress.on_epoch)  # fmt: skip
    show_outputs(console, result.outputs)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s wall, "
                  f"{time.process_time() - cpu:.0f} s CPU; open {result.outputs['report']}")  # fmt: skip
    return 0
