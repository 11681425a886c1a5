"""Largest-connected-component post-processing: its effect on a finished benchmark's table.

Every cell's saved adapter predicts the task's query cases once; each prediction is scored as it
comes out and again after keeping each structure's largest 26-connected component, side by side
(mean Dice and HD95 over the queries per task, method and k). The benchmark's own prediction
options are used, with ``largest_cc`` off for the raw side.

    fseft demo --out DEMO
    python perf/largest_cc.py demo --out DEMO
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from rich.console import Console
from rich.table import Table

from fseft.adapt.adapter_io import load_adapter
from fseft.benchmark import load_protocol, plan, read_cells
from fseft.benchmark.runner import ADAPTERS_DIR
from fseft.data.io import read_image, read_label
from fseft.evaluation import evaluate_masks
from fseft.inference import predict_image
from fseft.inference.postprocess import keep_largest_component
from fseft.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", help="protocol YAML or shipped name the benchmark ran")
    parser.add_argument("--out", required=True, help="the benchmark's output folder")
    args = parser.parse_args()
    protocol = load_protocol(args.protocol)
    resolved = plan(protocol, out=args.out)
    model = load_model(resolved.model)
    config = dataclasses.replace(protocol.predict_config(), largest_cc=False)
    table = Table("task", "method", "k", "Dice raw", "Dice LCC", "HD95 raw (mm)", "HD95 LCC (mm)",
                  title=f"{protocol.name}: largest connected component, mean over query cases")  # fmt: skip
    cells = sorted(read_cells([args.out]), key=lambda d: (d.cell.task_index, d.cell.method_index, d.cell.k))
    for cell in cells:
        task = resolved.task(cell.cell.task)
        adapted = load_adapter(f"{args.out}/{ADAPTERS_DIR}/{cell.cell_id}.safetensors", model)
        scores: dict[str, list[float]] = {"dice": [], "dice_cc": [], "hd": [], "hd_cc": []}
        for case in task.queries:
            image = read_image(case.image)
            label = predict_image(adapted, image, config=config).label.array
            cleaned = keep_largest_component(label.copy(), range(1, len(task.spec.structures) + 1))
            masks: dict = {}
            for source in case.labels:
                for name, mask in read_label(source, image, structures=task.spec.structures).items():
                    masks.setdefault(name, mask)
            for i, name in enumerate(task.spec.structures):
                for suffix, pred in (("", label), ("_cc", cleaned)):
                    m = evaluate_masks(pred == i + 1, masks[name], image.spacing, protocol.nsd_tolerance_mm)
                    scores[f"dice{suffix}"].append(m.dice)
                    scores[f"hd{suffix}"].append(m.hd95_mm)
        means = {key: statistics.fmean(v) for key, v in scores.items()}
        table.add_row(cell.cell.task, cell.cell.label, cell.cell.column, *(f"{means[key]:.3f}" for key in ("dice", "dice_cc")),
                      *(f"{means[key]:.1f}" for key in ("hd", "hd_cc")))  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
