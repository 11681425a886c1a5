"""Constrained transductive inference: extra cost per query, and an ablation of its benefit.

Cost (default): seconds per query volume and peak memory on the current device of per-query
refinement (query features + refinement steps) against plain prediction (sliding window over the
preprocessed volume), for a linear probe / spatial adapter on the synthetic assembly's target cases.

    python perf/transductive.py --synth DIR [--model MODEL] [--swin]

Ablation (``--ablation``): on the synthetic assembly, a novel structure is adapted from k support
cases of the target site and evaluated (Dice on the model grid) on the other target cases, without
the constraint, with it in batch mode (hinge, log-barrier) and per query (hinge, log-barrier),
for each k. Support and query cases never overlap.

    fseft synth DIR
    fseft pretrain --manifest DIR/manifest.csv --splits pretrain --model-arch unet-small ... --out RUN
    python perf/transductive.py --ablation --synth DIR --model RUN/model.pt --structure duodenum --k 1 5

Without ``--model`` the cost benchmark uses a randomly initialised small UNet (cost does not depend
on the weights); the ablation needs a pre-trained model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fseft.adapt import apply_method
from fseft.adapt.api import PeakMemory, adapt
from fseft.adapt.support import SupportVolume, load_support_volumes
from fseft.adapt.trainer import AdaptTrainConfig, heldout_dice, volume_logits
from fseft.adapt.transductive import PerQueryRefiner, TransductiveConfig, size_priors
from fseft.config import PreprocessConfig
from fseft.data.cases import Case
from fseft.data.manifests import load_manifest
from fseft.models import FoundationModel, ModelConfig, build_model, load_model


def target_cases(synth: Path, structure: str) -> list[Case]:
    """Target-site cases of the assembly annotating ``structure``, sorted by id."""
    cases = [c for c in load_manifest(synth / "manifest.csv") if c.split == "target"]
    return sorted(
        (c for c in cases if c.structures is None or structure in c.structures), key=lambda c: c.case_id
    )


def split_pool(cases: Sequence[Case], n_support: int) -> tuple[list[Case], list[Case]]:
    """First ``n_support`` cases form the support pool, the rest the queries."""
    return list(cases[:n_support]), list(cases[n_support:])


def per_query_dice(
    adapted, queries: Sequence[SupportVolume], priors=(), cfg: TransductiveConfig | None = None
) -> tuple[float, float]:
    """Mean Dice over the queries (refined per query when ``cfg``) and the mean refinement seconds per query."""
    structure = adapted.structures[0]
    if cfg is None:
        return statistics.mean(heldout_dice(adapted, [q])[structure] for q in queries), 0.0
    dices, extra = [], []
    with PerQueryRefiner(adapted, priors, cfg) as refiner:
        for q in queries:
            extra.append(refiner.refine(q.case_id, q.image).seconds)
            dices.append(heldout_dice(adapted, [q])[structure])
    return statistics.mean(dices), statistics.mean(extra)


def ablation(args: argparse.Namespace) -> list[dict]:
    """Dice without / with the constraint (batch and per query, hinge and log-barrier) for each k."""
    base = load_model(args.model)
    pool, query_cases = split_pool(target_cases(args.synth, args.structure), args.pool)
    queries = load_support_volumes(query_cases, [args.structure], base.config.preprocess)
    train = AdaptTrainConfig(
        max_epochs=args.epochs, early_stopping=False, device="cpu", num_samples=args.num_samples
    )
    tx = TransductiveConfig(
        warmup_epochs=args.warmup, lam=args.lam, margin=args.margin, lr=args.tx_lr, steps=args.tx_steps
    )
    rows = []
    for k in args.k:
        for seed in range(args.seeds):
            for mode, constraint in (("none", None), ("batch", "hinge"), ("batch", "log-barrier")):
                cfg = replace(
                    tx, mode="per-query" if mode == "none" else "batch", constraint=constraint or "hinge"
                )
                start = time.perf_counter()
                run = adapt(base, pool, args.structure, k=k, seed=seed, method=args.method, train_config=train,
                            transductive=cfg, queries=None if mode == "none" else query_cases)  # fmt: skip
                adapted, result = run.model, run.transductive
                seconds = time.perf_counter() - start
                dice, _ = per_query_dice(adapted, queries)
                # measured directly (query features + constraint gradients), not as the difference of
                # two whole runs, which other load on the machine makes noisy
                added = (result.feature_time_s + result.constraint_time_s) / len(queries)
                rows.append(_row(k, seed, mode, constraint, dice, added, seconds, result))
                print(json.dumps(rows[-1]), flush=True)
                if mode == "none":
                    for pq in ("hinge", "log-barrier"):
                        pq_cfg = replace(cfg, constraint=pq)
                        dice_pq, added_pq = per_query_dice(adapted, queries, result.priors, pq_cfg)
                        rows.append(_row(k, seed, "per-query", pq, dice_pq, added_pq, seconds, result))
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def _row(k, seed, mode, constraint, dice, added, seconds, result) -> dict:
    prior = result.priors[0]
    return {
        "k": k,
        "seed": seed,
        "mode": mode,
        "constraint": constraint or "-",
        "dice": round(dice, 4),
        "added_s_per_query": round(added, 3),
        "adapt_s": round(seconds, 1),
        "prior": round(prior.proportion, 5),
        "prior_n_used": prior.n_used,
    }


def cost(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    structure = args.structure
    models: list[tuple[str, FoundationModel]] = []
    if args.model:
        models.append((args.model, load_model(args.model)))
    else:
        pre = PreprocessConfig(spacing=(5.0, 5.0, 5.0), roi=(48, 48, 48))
        models.append(
            (
                "unet-small-8 (random)",
                build_model(
                    ModelConfig(arch="unet-small", feature_size=8, structures=("liver",), preprocess=pre)
                ),
            )
        )
        if args.swin:
            models.append(
                (
                    "swinunetr-12 (random)",
                    build_model(
                        ModelConfig(
                            arch="swinunetr",
                            feature_size=12,
                            structures=("liver",),
                            preprocess=replace(pre, roi=(64, 64, 64)),
                        )
                    ),
                )
            )
    rows = []
    cases = target_cases(args.synth, structure)[: args.queries + 1]
    for name, base in models:
        vols = load_support_volumes(cases, [structure], base.config.preprocess)
        priors = size_priors(vols[:1], [structure], base.config.preprocess.spacing)
        for method in ("linear-probe", "spatial-adapter"):
            adapted = apply_method(base, method, [structure]).to(device)
            with torch.no_grad():
                adapted.head.bias += 3.0  # a biased head: the refinement has work to do
            plain, refined = [], []
            with PeakMemory(device) as mem_plain:
                for v in vols[1:]:
                    t = time.perf_counter()
                    volume_logits(adapted, v.image, device=device)
                    plain.append(time.perf_counter() - t)
            cfg = TransductiveConfig(
                mode="per-query", steps=args.tx_steps, lr=args.tx_lr, constraint="log-barrier"
            )
            with PeakMemory(device) as mem_tx, PerQueryRefiner(adapted, priors, cfg) as refiner:
                for v in vols[1:]:
                    refined.append(refiner.refine(v.case_id, v.image).seconds)
            shape = "x".join(str(s) for s in vols[1].image.shape[1:])
            rows.append({
                "model": name, "method": method, "device": str(device), "volume": shape,
                "predict_s": round(statistics.median(plain), 3), "refine_s": round(statistics.median(refined), 3),
                "steps": cfg.steps, "pool": cfg.pool,
                "predict_peak_mib": round(mem_plain.peak / 2**20), "refine_peak_mib": round(mem_tx.peak / 2**20),
                "memory_kind": mem_tx.kind,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def show(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synth", type=Path, required=True, help="synthetic assembly folder ('fseft synth')")
    parser.add_argument("--model", default=None, help="model name or file (ablation: required)")
    parser.add_argument("--structure", default="duodenum")
    parser.add_argument(
        "--ablation", action="store_true", help="run the ablation instead of the cost benchmark"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--pool", type=int, default=6, help="target cases reserved for the support pool")
    parser.add_argument("--method", default="linear-probe")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--warmup", type=int, default=20, help="supervised epochs before the batch constraint"
    )
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=0.3)
    parser.add_argument("--tx-lr", type=float, default=None, help="per-query Adam rate (default: the method's)")
    parser.add_argument("--tx-steps", type=int, default=50)
    parser.add_argument("--queries", type=int, default=3, help="cost: query volumes timed")
    parser.add_argument("--swin", action="store_true", help="cost: also SwinUNETR-12")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.ablation and not args.model:
        parser.error("--ablation needs --model (a model pre-trained on the assembly's pretrain split)")
    rows = ablation(args) if args.ablation else cost(args)
    show(
        rows,
        "transductive ablation (Dice on the model grid)" if args.ablation else "per-query refinement cost",
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
