"""Per-cell cost of the OpenKBP benchmark with and without reusing frozen-backbone features.

Runs the same few cells of the shipped ``openkbp`` protocol (its data split, on the real OpenKBP
cases) twice in one process: first each cell as before (the backbone runs on every support and
query volume of every cell), then the same cells sharing one :class:`~fseft.models.feature_store.FeatureStore`
(fresh, in a temporary folder: the first cell fills it). It prints each cell's wall time both ways,
checks that both give identical metrics, and prints the ratio. ``--estimate`` then times one
training step of every method family and extrapolates the whole shipped protocol's cost.

    python perf/benchmark_cells.py                                  # random resunet-8 (4x4x3 mm, ROI 64), 3 queries
    python perf/benchmark_cells.py --model resunet.openkbp --queries 13 --estimate

Without ``--model`` the backbone is random with the shape of the OpenKBP foundation model: costs
are those of the real model, Dice values mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from fseft.adapt.api import adapt
from fseft.adapt.support import load_support_volumes
from fseft.adapt.trainer import AdaptTrainConfig
from fseft.benchmark import load_protocol, plan
from fseft.benchmark.protocol import MethodSpec
from fseft.benchmark.runner import evaluate_queries, run_cell
from fseft.config import PreprocessConfig
from fseft.models import ModelConfig, build_model, load_model, save_model
from fseft.models.feature_store import FeatureStore, FeatureStoreConfig

#: (method row, k) of the cells timed both ways.
CELLS = (("zero-shot", 1), ("linear-probe", 1), ("spatial-adapter", 1), ("spatial-adapter +TI", 1),
         ("linear-probe", 5), ("spatial-adapter", 5))  # fmt: skip
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
    protocol = dataclasses.replace(protocol, seeds=(0,), train={**protocol.train, "max_epochs": args.epochs})
    p = plan(protocol, data_root=args.data_root, out=out, model=model, check_methods=False)
    tasks = tuple(dataclasses.replace(t, queries=t.queries[: args.queries]) for t in p.tasks)
    return dataclasses.replace(p, tasks=tasks)


def timed_cells(p, base, out: Path, store: FeatureStore | None) -> list[tuple[str, float, list]]:
    rows = []
    for label, k in CELLS:
        cell = next(c for c in p.cells if c.task == "brainstem" and c.label == label and c.k == k)
        start = time.perf_counter()
        result = run_cell(p, cell, base, out, features=store)
        rows.append((f"{label} k={k}", time.perf_counter() - start, [dataclasses.astuple(m) for m in result.metrics]))
    return rows


def compare(args: argparse.Namespace, model: str, tmp: Path) -> None:
    p = resolved_plan(args, model, tmp / "out")
    base = load_model(model)
    task = p.task("brainstem")
    load_support_volumes(task.pool, task.spec.structures, base.config.preprocess)  # preprocessed once for both
    print(f"model {model}; task brainstem, {len(p.task('brainstem').queries)} queries, max {args.epochs} epochs")
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


def step_seconds(base, p, method: str, cfg: AdaptTrainConfig) -> float:
    """Seconds per training step (one support volume, ``num_samples`` crops) of ``method`` at k=1."""
    task = p.task("brainstem")
    result = adapt(base, task.pool, task.spec.structures, k=1, seed=0, method=method, train_config=cfg)
    return result.record.train_time_s / max(1, result.record.epochs_run)


def estimate(args: argparse.Namespace, model: str, tmp: Path) -> None:
    """Extrapolate the shipped protocol from measured unit costs (``--epochs-assumed`` epochs per cell)."""
    full = plan(load_protocol("openkbp"), data_root=args.data_root, out=tmp / "est", model=model, check_methods=False)
    p = resolved_plan(args, model, tmp / "est")
    base = load_model(model)
    pre = base.config.preprocess
    task = p.task("brainstem")
    start = time.perf_counter()
    volumes = load_support_volumes(task.pool[:3], task.spec.structures, pre)
    store = FeatureStore()
    for v in volumes:
        store.windows(base.features, "x", v.image[None], pre.roi, overlap=0.5, sw_batch_size=2)
    t_volume = (time.perf_counter() - start) / len(volumes)
    adapted = adapt(base, task.pool, task.spec.structures, k=1, seed=0, method="spatial-adapter",
                    train_config=AdaptTrainConfig(max_epochs=1, device="cpu")).model  # fmt: skip
    q = FeatureStore()
    evaluate_queries(adapted, task.queries, task.spec.structures, p.protocol, features=q)
    start = time.perf_counter()
    evaluate_queries(adapted, task.queries, task.spec.structures, p.protocol, features=q)
    t_replay = (time.perf_counter() - start) / len(task.queries)
    cfg = AdaptTrainConfig(max_epochs=2, early_stopping=False, device="cpu")
    steps = {m: step_seconds(base, p, m, cfg) for m in ("linear-probe", "spatial-adapter", "bitfit", "affine-ln", "lora", "full-ft")}
    n_queries = max(len(t.queries) for t in full.tasks)
    pool = {c.case_id for t in full.tasks for c in t.pool}
    queries = {c.case_id for t in full.tasks for c in t.queries}
    print(f"\nunit costs: backbone {t_volume:.1f} s/volume, replay {t_replay:.1f} s/query, "
          + ", ".join(f"{m} {s:.2f} s/step" for m, s in steps.items()))  # fmt: skip
    once = (len(pool) + len(queries)) * t_volume
    by_method: Counter[str] = Counter()
    for cell in full.cells:
        spec: MethodSpec = full.method(cell)
        epochs = 0 if spec.method == "zero-shot" else args.epochs_assumed
        train = epochs * cell.k * steps.get(spec.method, steps["spatial-adapter"])
        black_box = spec.method in ("zero-shot", "linear-probe", "spatial-adapter")
        predict = n_queries * (t_replay if black_box else t_volume)
        by_method[spec.row_label] += train + predict
    total = once + sum(by_method.values())
    print(f"shipped openkbp: {len(full.cells)} cells, {args.epochs_assumed} epochs per cell assumed")
    print(f"  {'backbone once on every pool and query volume':<48} {once / 3600:6.2f} h")
    for label, seconds in by_method.items():
        print(f"  {label:<48} {seconds / 3600:6.2f} h ({sum(1 for c in full.cells if c.label == label)} cells)")
    print(f"  {'total':<48} {total / 3600:6.2f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("FSEFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data-root", type=Path, default=shared / "openkbp", help="folder holding OpenKBP's cases.csv")
    parser.add_argument("--model", help="model name or file (default: a random resunet-8 like resunet.openkbp)")
    parser.add_argument("--queries", type=int, default=3, help="query cases per cell (the protocol has 13)")
    parser.add_argument("--epochs", type=int, default=20, help="maximum training epochs of the timed cells")
    parser.add_argument("--memory-gb", type=float, default=1.0, help="in-memory bound of the feature store")
    parser.add_argument("--estimate", action="store_true", help="also extrapolate the whole shipped protocol")
    parser.add_argument("--epochs-assumed", type=int, default=60, help="epochs per trained cell in the estimate")
    parser.add_argument("--skip-compare", action="store_true", help="only the estimate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ["FSEFT_CACHE"] = str(tmp / "cache")  # cold preprocessed-volume cache, as in a first run
        model = model_file(args, tmp)
        if not args.skip_compare:
            compare(args, model, tmp)
        if args.estimate:
            estimate(args, model, tmp)


if __name__ == "__main__":
    main()
