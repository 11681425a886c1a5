"""Per-cell cost of the OpenKBP benchmark with and without reusing frozen-backbone features.

Runs the same cells of the shipped ``openkbp`` protocol (its data split and its CPU training budget,
on the real OpenKBP cases) twice in one process: first each cell as before (the backbone runs on
every support and query volume of every cell), then the same cells sharing one
:class:`~fseft.models.feature_store.FeatureStore` (fresh, in a temporary folder: the first cell fills
it). It prints each cell's wall time both ways, checks that both give identical metrics, and prints
the ratio. A PEFT cell (BitFit) is timed too: its backbone changes, so it cannot reuse features.

    python perf/benchmark_cells.py                                  # random resunet-8 (4x4x3 mm, ROI 64), 3 queries
    python perf/benchmark_cells.py --model resunet.openkbp --queries 13

Without ``--model`` the backbone is random with the shape of the OpenKBP foundation model: costs
are those of the real model, Dice values mean nothing. The whole grid's measured cost is in each
cell's result (``cost.cell_wall_s``): docs/results/openkbp.md sums it per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from fseft.adapt.support import load_support_volumes
from fseft.benchmark import load_protocol, plan
from fseft.benchmark.runner import run_cell
from fseft.config import PreprocessConfig
from fseft.models import ModelConfig, build_model, load_model, save_model
from fseft.models.feature_store import FeatureStore, FeatureStoreConfig

#: (method row, k) of the cells timed both ways.
CELLS = (("zero-shot", 1), ("linear-probe", 1), ("spatial-adapter", 1), ("spatial-adapter +TI", 1),
         ("linear-probe", 5), ("spatial-adapter", 5), ("spatial-adapter", 10), ("bitfit", 1))  # fmt: skip
STRUCTURES = ("brainstem", "spinal_cord", "parotid_right", "parotid_left", "mandible")


def model_file(args: argparse.Namespace, folder: Path) -> str:
    if args.model:
        return args.model
    torch.manual_seed(0)
    pre = PreprocessConfig(spacing=(4.0, 4.0, 3.0), roi=(64, 64, 64))
    cfg = ModelConfig(arch="resunet", feature_size=8, structures=STRUCTURES, preprocess=pre)
    return str(save_model(build_model(cfg).eval(), folder / "resunet8.pt"))


def resolved_plan(args: argparse.Namespace, model: str, out: Path):
    protocol = load_protocol("openkbp")
    train = protocol.train if args.epochs is None else {**protocol.train, "max_epochs": args.epochs}
    protocol = dataclasses.replace(protocol, seeds=(0,), train=train)
    p = plan(protocol, data_root=args.data_root, out=out, model=model, check_methods=False)
    tasks = tuple(dataclasses.replace(t, queries=t.queries[: args.queries]) for t in p.tasks)
    return dataclasses.replace(p, tasks=tasks)


def timed_cells(p, base, out: Path, store: FeatureStore | None) -> list[tuple[str, float, list]]:
    rows = []
    for label, k in CELLS:
        cell = next(c for c in p.cells if c.task == "brainstem" and c.label == label and c.k == k)
        start = time.perf_counter()
        result = run_cell(p, cell, base, out, features=store)
        rows.append(
            (f"{label} k={k}", time.perf_counter() - start, [dataclasses.astuple(m) for m in result.metrics])
        )
    return rows


def compare(args: argparse.Namespace, model: str, tmp: Path) -> None:
    p = resolved_plan(args, model, tmp / "out")
    base = load_model(model)
    task = p.task("brainstem")
    load_support_volumes(task.pool, task.spec.structures, base.config.preprocess)  # preprocessed once for both
    print(f"model {model}; task brainstem, {len(p.task('brainstem').queries)} queries, training {p.protocol.train}")
    before = timed_cells(p, base, tmp / "out", None)
    store = FeatureStore(FeatureStoreConfig(str(tmp / "features"), memory_gb=args.memory_gb, disk_gb=64))
    after = timed_cells(p, base, tmp / "out", store)
    print(f"{'cell':<28} {'before s':>9} {'after s':>9} {'ratio':>7} same metrics")
    for (name, t0, m0), (_, t1, m1) in zip(before, after, strict=True):
        print(f"{name:<28} {t0:9.1f} {t1:9.1f} {t0 / t1:6.1f}x {m0 == m1}")
    total0, total1 = sum(r[1] for r in before), sum(r[1] for r in after)
    warm0, warm1 = sum(r[1] for r in before[1:]), sum(r[1] for r in after[1:])
    print(f"{'all cells':<28} {total0:9.1f} {total1:9.1f} {total0 / total1:6.1f}x")
    print(f"{'without the first (warm)':<28} {warm0:9.1f} {warm1:9.1f} {warm0 / warm1:6.1f}x")
    print(f"store: {store.misses} volumes computed, {store.hits} reused")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shared = Path(
        os.environ.get("FSEFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    parser.add_argument(
        "--data-root", type=Path, default=shared / "openkbp", help="folder holding OpenKBP's cases.csv"
    )
    parser.add_argument(
        "--model", help="model name or file (default: a random resunet-8 like resunet.openkbp)"
    )
    parser.add_argument("--queries", type=int, default=3, help="query cases per cell (the protocol has 13)")
    parser.add_argument(
        "--epochs", type=int, help="max_epochs of the timed cells (default: the protocol's budget)"
    )
    parser.add_argument("--memory-gb", type=float, default=1.0, help="in-memory bound of the feature store")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ["FSEFT_CACHE"] = str(tmp / "cache")  # cold preprocessed-volume cache, as in a first run
        model = model_file(args, tmp)
        compare(args, model, tmp)


if __name__ == "__main__":
    main()
