"""Few-shot adaptation speed: naive path (frozen backbone on every crop) vs cached black-box path.

For linear-probe and spatial-adapter, on the synthetic assembly (generated into a temporary folder),
runs ``fseft.adapt`` twice with the same seed (same support set, same crops), once per path, and
prints side by side the time per epoch, the time to convergence (feature caching included), their
ratio, and the final Dice of each on the held-out target-site cases, so the speed-up is read at
equal Dice.

    python perf/adapt_speed.py                                   # CPU: unet-small 32^3 and SwinUNETR-12 64^3
    python perf/adapt_speed.py --arch swinunetr --feature-size 48 --roi 96 --spacing 3 --preset default --device cuda
    python perf/adapt_speed.py --model unet-small.synth          # a pre-trained model instead of random weights

Without ``--model`` the backbones are randomly initialised: Dice values then only show that both
paths agree, not how good adaptation is.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from fseft.adapt.api import adapt
from fseft.adapt.support import load_support_volumes
from fseft.adapt.trainer import AdaptTrainConfig, heldout_dice
from fseft.config import PreprocessConfig
from fseft.data.synth import generate_assembly
from fseft.models import FoundationModel, ModelConfig, build_model, load_model
from fseft.runtime import resolve_device

METHODS = ("linear-probe", "spatial-adapter")
CPU_DEFAULTS = (("unet-small", 8, 32), ("swinunetr", 12, 64))


def models(args: argparse.Namespace) -> list[FoundationModel]:
    if args.model:
        return [load_model(args.model)]
    specs = [(args.arch, args.feature_size, args.roi)] if args.arch else CPU_DEFAULTS
    out = []
    for arch, feature_size, roi in specs:
        torch.manual_seed(0)
        pre = PreprocessConfig(spacing=(args.spacing,) * 3, roi=(roi,) * 3)
        out.append(
            build_model(
                ModelConfig(
                    arch=arch, feature_size=feature_size, structures=("liver", "spleen"), preprocess=pre
                )
            )
        )
    return out


def run(model: FoundationModel, assembly, args: argparse.Namespace, device: torch.device) -> list[dict]:
    target = [c for c in assembly.cases if c.split == "target"]
    query_cases = target[args.k :]
    structures = (args.structure,)
    rows = []
    for method in args.methods.split(","):
        results = {}
        for path in ("naive", "cached"):
            cfg = AdaptTrainConfig(
                max_epochs=args.epochs,
                num_samples=args.num_samples,
                feature_cache="off" if path == "naive" else "on",
                device=str(device),
            )
            start = time.perf_counter()
            result = adapt(model, target, structures, k=args.k, seed=args.seed, method=method, train_config=cfg)
            adapted, record = result.model, result.record
            total = time.perf_counter() - start
            # the support is the first k of the seeded permutation; score on the target cases not used
            query = [c for c in target if c.case_id not in record.support_case_ids] or query_cases
            volumes = load_support_volumes(query, structures, model.config.preprocess)
            dice = heldout_dice(adapted.to(device), volumes, device=device)[structures[0]]
            results[path] = {
                "epoch_s": record.train_time_s / max(1, record.epochs_run),
                "total_s": total,
                "feature_s": record.feature_time_s,
                "epochs": record.epochs_run,
                "stop": record.stop_reason,
                "dice": dice,
                "peak_mib": record.peak_memory_bytes / 2**20,
            }
        rows.append(
            {
                "model": f"{model.config.arch}-{model.config.feature_size} roi {model.config.preprocess.roi[0]}",
                "method": method,
                **results,
            }
        )
    return rows


def show(rows: list[dict]) -> None:
    head = f"{'model':<24} {'method':<16} {'path':<7} {'s/epoch':>8} {'epochs':>6} {'stop':>10} {'to conv. s':>10} {'(feat. s)':>9} {'peak MiB':>9} {'Dice':>6}"
    print(head)
    print("-" * len(head))
    for row in rows:
        for path in ("naive", "cached"):
            r = row[path]
            print(
                f"{row['model']:<24} {row['method']:<16} {path:<7} {r['epoch_s']:8.3f} {r['epochs']:6d} {r['stop']:>10} "
                f"{r['total_s']:10.1f} {r['feature_s']:9.1f} {r['peak_mib']:9.0f} {r['dice']:6.3f}"
            )
        n, c = row["naive"], row["cached"]
        print(
            f"{'':<24} {'':<16} {'ratio':<7} {n['epoch_s'] / c['epoch_s']:7.1f}x {'':>6} {'':>10} "
            f"{n['total_s'] / c['total_s']:9.1f}x {'':>9} {'':>9} {c['dice'] - n['dice']:+6.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model name or file (default: random unet-small and SwinUNETR-12)")
    parser.add_argument("--arch", help="build one random model of this backbone instead of the CPU defaults")
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--spacing", type=float, default=6.0, help="model voxel size (mm) for random models")
    parser.add_argument("--preset", default="tiny", help="synthetic assembly preset (tiny, default)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (default: the preset's)")
    parser.add_argument("--structure", default="pancreas")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=30, help="maximum epochs (early stopping still applies)"
    )
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.setdefault("FSEFT_CACHE", str(Path(tmp) / "cache"))
        assembly = generate_assembly(
            Path(tmp) / "synth", cases=args.cases, seed=0, preset=args.preset, workers=1
        )
        print(
            f"device {device}; synthetic preset {args.preset}, {len(assembly.cases)} cases; k={args.k}, target {args.structure}"
        )
        rows = []
        for model in models(args):
            rows += run(model.to(device), assembly, args, device)
    show(rows)


if __name__ == "__main__":
    main()
