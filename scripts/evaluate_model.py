"""Score a foundation model on held-out cases as a user would: ``fseft predict`` then ``fseft evaluate``.

    python scripts/evaluate_model.py resunet.openkbp --manifest ../shared/data/openkbp/cases.csv \
        --split validation-pats --out runs/eval-openkbp

Predicts every image of the split (links to the images in OUT/images, predictions in OUT/pred, on
each input's own grid), scores them against the manifest's labels on that grid (Dice, HD95, NSD at
2 mm) and writes OUT/summary.json: per-structure mean and standard deviation over the cases, the
number of cases, and the prediction wall time per volume. ``scripts/bundle_model.py --eval`` records
that file with a bundled model.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from fseft.runtime import machine_summary


def _split_images(manifest: Path, split: str, folder: Path) -> list[str]:
    """Link the split's images into ``folder`` as ``<case>.nii.gz``; returns the case ids."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    with manifest.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("split") != split:
                continue
            link = folder / f"{row['case']}.nii.gz"
            if not link.exists():
                link.symlink_to((manifest.parent / row["image"]).resolve())
            cases.append(row["case"])
    if not cases:
        raise SystemExit(f"{manifest}: no case in split {split!r}")
    return cases


def _summary(metrics_csv: Path) -> dict[str, dict[str, float]]:
    """Per-structure mean and sample std of Dice, HD95 and NSD over cases (finite values only)."""
    columns = {"dice": "dice", "hd95": "hd95_mm", "nsd": "nsd"}
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, int] = defaultdict(int)
    with metrics_csv.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            counts[row["structure"]] += 1
            for metric, column in columns.items():
                v = float(row[column]) if row[column] not in ("", "nan") else math.nan
                if math.isfinite(v):
                    values[row["structure"]][metric].append(v)
    out: dict[str, dict[str, float]] = {}
    for structure, n in counts.items():
        stats: dict[str, float] = {"cases": n}
        for metric in columns:
            v = values[structure][metric]
            stats[metric] = round(statistics.fmean(v), 4) if v else math.nan
            stats[f"{metric}_std"] = round(statistics.stdev(v), 4) if len(v) > 1 else 0.0
        out[structure] = stats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="registered model name or model file")
    parser.add_argument("--manifest", type=Path, required=True, help="OpenKBP-style cases.csv (case, split, image, label)")
    parser.add_argument("--split", default="validation-pats")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap of fseft predict")
    parser.add_argument("--largest-cc", action="store_true", help="fseft predict --largest-cc (one component per structure)")
    args = parser.parse_args()
    cases = _split_images(args.manifest, args.split, args.out / "images")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    t0 = time.perf_counter()
    post = ["--largest-cc"] if args.largest_cc else []
    subprocess.run(["fseft", "predict", str(args.out / "images"), "--model", args.model, "--overlap",
                    str(args.overlap), *post, "--out", str(args.out / "pred"), "--overwrite"], check=True, env=env)  # fmt: skip
    seconds = time.perf_counter() - t0
    subprocess.run(["fseft", "evaluate", str(args.out / "pred"), str(args.manifest), "--out",
                    str(args.out / "eval"), "--overwrite"], check=True, env=env)  # fmt: skip
    per_structure = _summary(args.out / "eval" / "metrics_per_case.csv")
    base = list(per_structure.values())
    summary = {
        "model": args.model,
        "cases": len(cases),
        "split": args.split,
        "manifest": str(args.manifest),
        "metrics": per_structure,
        "mean_dice": round(sum(s["dice"] for s in base) / len(base), 4),
        "predict_seconds_per_volume": round(seconds / len(cases), 2),
        "overlap": args.overlap,
        "largest_cc": args.largest_cc,
        "machine": machine_summary(),
        "command": f"python scripts/evaluate_model.py {args.model} --manifest {args.manifest} --split {args.split}"
        + (" --largest-cc" if args.largest_cc else ""),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    width = max(len(s) for s in per_structure)
    for name, s in per_structure.items():
        print(f"{name:<{width}}  Dice {s['dice']:.3f} ± {s['dice_std']:.3f}  HD95 {s['hd95']:.1f} mm  "
              f"NSD {s['nsd']:.3f}  ({s['cases']} cases)")  # fmt: skip
    print(f"mean Dice {summary['mean_dice']:.3f}; prediction {summary['predict_seconds_per_volume']} s/volume")


if __name__ == "__main__":
    main()
