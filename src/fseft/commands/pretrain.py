"""``fseft pretrain``: partial-label pre-training of a foundation model (single process or torchrun DDP)."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand."""
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a foundation model on partially labelled datasets",
        description="Supervised pre-training of a universal segmentation model (one sigmoid channel per "
        "structure) on an assembly of partially labelled CT datasets: soft Dice + BCE computed only over "
        "the structures each case annotates, dataset-balanced sampling, AdamW with warm-up cosine "
        "schedule. Writes OUT/model.pt (load with fseft.models.load_model), OUT/train_log.jsonl and a "
        "resumable OUT/checkpoint.pt. Multi-GPU / multi-node: launch with "
        "'torchrun --nproc_per_node=N -m fseft pretrain ...' (batch size is per process).",
        epilog="Example: fseft pretrain --manifest synth/manifest.csv --splits pretrain --model-arch unet-small "
        "--feature-size 8 --spacing 4 4 4 --roi 64 64 64 --steps 500 --out runs/synth",
    )
    data = p.add_argument_group("data")
    src = data.add_mutually_exclusive_group(required=True)
    src.add_argument("--assembly", type=Path, metavar="YAML", help="assembly YAML listing datasets "
                     "(manifest, optional template, structures, splits, weight; see fseft.training.assembly)")  # fmt: skip
    src.add_argument("--manifest", type=Path, metavar="PATH",
                     help="one manifest (CSV, dataset.json, folder) whose cases declare their structures")  # fmt: skip
    data.add_argument("--data-root", type=Path, metavar="DIR",
                      help="with --assembly: manifest paths are relative to DIR (default: the YAML's folder)")  # fmt: skip
    data.add_argument(
        "--splits", nargs="+", metavar="SPLIT", help="with --manifest: train on these splits only"
    )
    data.add_argument("--structures", nargs="+", metavar="NAME",
                      help="model structures in channel order (default: union of annotated, universal order)")  # fmt: skip
    data.add_argument("--val-cases", type=int, default=None, metavar="N",
                      help="hold out N more training cases for validation (cases of a val* split always are)")  # fmt: skip
    data.add_argument(
        "--cache-dir", type=Path, default=None, help="preprocessed-volume cache (default OUT/cache)"
    )
    model = p.add_argument_group("model")
    model.add_argument("--model-arch", default="swinunetr", help="backbone: swinunetr, unet3d, unet-small, resunet")
    model.add_argument(
        "--feature-size", type=int, default=48, help="backbone width (SwinUNETR: multiple of 12)"
    )
    defaults = PreprocessConfig()
    model.add_argument("--roi", type=int, nargs=3, default=defaults.roi, metavar=("X", "Y", "Z"),
                       help="training patch size in voxels")  # fmt: skip
    model.add_argument("--spacing", type=float, nargs=3, default=defaults.spacing, metavar=("X", "Y", "Z"),
                       help="voxel spacing (mm) volumes are resampled to")  # fmt: skip
    model.add_argument(
        "--num-samples", type=int, default=defaults.num_samples, help="random crops per volume per step"
    )
    model.add_argument(
        "--no-augment", action="store_true", help="disable flips, rotations and intensity shifts"
    )
    model.add_argument("--no-spatial-augment", action="store_true",
                       help="keep the intensity shift but no flips or rotations (models with left/right structures)")  # fmt: skip
    model.add_argument("--pos", type=float, default=defaults.pos,
                       help="relative weight of crops centred on an annotated structure")  # fmt: skip
    model.add_argument("--neg", type=float, default=defaults.neg,
                       help="relative weight of crops centred on a background body voxel")  # fmt: skip
    model.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing (SwinUNETR)")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    train.add_argument("--batch-size", type=int, default=1, help="volumes per process per step")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    train.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay")
    train.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before cosine decay")
    train.add_argument("--bce-weight", type=float, default=1.0, help="weight of the BCE term (0: Dice only)")
    train.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                       help="mixed precision on GPU (ignored with a warning on CPU)")  # fmt: skip
    train.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation"
    )
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument(
        "--num-workers", type=int, default=0, help="data-loader workers (results do not depend on it)"
    )
    train.add_argument("--channels-last", action="store_true",
                       help="channels_last_3d memory format (faster on CPU for resunet; see perf/train_step.py)")  # fmt: skip
    run_g = p.add_argument_group("run")
    run_g.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    run_g.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    run_g.add_argument(
        "--val-every", type=int, default=0, help="validation Dice every N steps (0: at the end)"
    )
    run_g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (0: at the end)")
    run_g.add_argument("--log-every", type=int, default=10, help="train_log.jsonl record every N steps")
    p.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(AssemblyConfig, PreprocessConfig, TrainConfig) from the namespace."""
    from ..errors import ConfigError
    from ..training.assembly import AssemblyConfig, DatasetSpec, load_assembly
    from ..training.config import TrainConfig

    if args.assembly is not None:
        if args.splits:
            raise ConfigError("--splits applies to --manifest; put 'splits' in the assembly YAML instead")
        assembly = load_assembly(args.assembly, args.data_root)
        overrides: dict[str, Any] = {}
        if args.structures:
            overrides["structures"] = tuple(args.structures)
        if args.val_cases is not None:
            overrides["val_cases"] = args.val_cases
        if overrides:
            assembly = AssemblyConfig(**{**{f: getattr(assembly, f) for f in ("datasets", "structures", "val_cases")},
                                         **overrides})  # fmt: skip
    else:
        if args.data_root is not None:
            raise ConfigError("--data-root applies to --assembly")
        splits = tuple(args.splits) if args.splits else None
        assembly = AssemblyConfig(
            datasets=(DatasetSpec(args.manifest, splits=splits),),
            structures=tuple(args.structures) if args.structures else None,
            val_cases=args.val_cases or 0,
        )
    preprocess = PreprocessConfig(
        spacing=tuple(args.spacing),
        roi=tuple(args.roi),
        num_samples=args.num_samples,
        augment=not args.no_augment,
        spatial_augment=not args.no_spatial_augment,
        pos=args.pos,
        neg=args.neg,
    )
    train = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, bce_weight=args.bce_weight, amp=args.amp, seed=args.seed,
        val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
        num_workers=args.num_workers, device=args.device, channels_last=args.channels_last,
    )  # fmt: skip
    return assembly, preprocess, train


def run(args: argparse.Namespace) -> int:
    """Pre-train and write ``OUT/model.pt``; returns the exit code."""
    from rich.console import Console

    from ..config import to_dict
    from ..data.dataset import CachedCaseDataset
    from ..models import ModelConfig, build_model, save_model
    from ..outputs import plan_outputs
    from ..runtime import barrier, distributed_session, seed_everything
    from ..training.assembly import data_key, resolve_assembly
    from ..training.checkpointing import CHECKPOINT_NAME, LOG_NAME
    from ..training.pretrain import pretrain

    assembly_cfg, preprocess, train = _configs(args)
    if args.grad_checkpoint and args.model_arch != "swinunetr":
        log.warning("--grad-checkpoint applies to SwinUNETR only: ignored for %s", args.model_arch)
    out: Path = args.out
    cache_dir = args.cache_dir or out / "cache"
    plan_outputs([out / CHECKPOINT_NAME, out / "model.pt", out / LOG_NAME], folders=[cache_dir],
                 overwrite=args.resume, hint="pass --resume to continue that run, or use another output folder")  # fmt: skip
    with distributed_session(train.device) as ctx:
        console = Console(stderr=True, quiet=not ctx.is_main)
        if not ctx.is_main:  # rank 0 speaks for the job
            logging.getLogger("fseft").setLevel(logging.WARNING)
        assembly = resolve_assembly(assembly_cfg, train.seed)
        model_cfg = ModelConfig(
            arch=args.model_arch, feature_size=args.feature_size, structures=assembly.structures,
            preprocess=preprocess, use_checkpoint=args.grad_checkpoint,
        )  # fmt: skip
        seed_everything(train.seed)
        model = build_model(model_cfg)
        structures = model.structures
        sources = [
            CachedCaseDataset(cases, structures, preprocess, cache_dir, "train")
            for _, cases in assembly.groups
        ]
        val = CachedCaseDataset(assembly.val_cases, structures, preprocess, cache_dir, "eval")
        _warm_cache(console, [*sources, val], ctx.rank, ctx.world_size)
        barrier(ctx)
        console.print(
            f"pretrain: {len(structures)} structures, {len(sources)} datasets "
            f"({sum(len(s) for s in sources)} cases), {len(val)} validation cases, "
            f"{model.num_parameters() / 1e6:.2f} M parameters, {ctx.world_size} process(es) on {ctx.device}"
        )
        run_key = {"model": model_cfg.to_dict(), "data": data_key(assembly)}
        with _TrainProgress(console, train.steps) as callback:
            result = pretrain(
                model, sources, structures, train, out, ctx=ctx, weights=assembly.weights,
                val_samples=val, roi=preprocess.roi, resume=args.resume, run_key=run_key, callback=callback,
            )  # fmt: skip
        if ctx.is_main:
            extra = {
                "command": _command_line(args),
                "seed": train.seed,
                "data": to_dict(assembly_cfg),
                "datasets": {name: len(cases) for name, cases in assembly.groups},
                "train": to_dict(train),
                "steps": result.step,
                "elapsed_s": round(result.elapsed_s, 1),
                "val_dice": result.val_dice,
            }
            path = save_model(result.model, out / "model.pt", extra)
            console.print(f"wrote {path}")
            if result.val_dice:
                mean = sum(result.val_dice.values()) / len(result.val_dice)
                console.print(f"validation Dice (mean over {len(result.val_dice)} structures): {mean:.3f}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """An explicit ``fseft pretrain`` command line reproducing this run (every option spelled out)."""
    words = ["fseft", "pretrain"]
    for dest, value in vars(args).items():
        if dest in ("func", "command", "debug") or value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _warm_cache(console: Any, datasets: list[Any], rank: int, world_size: int) -> None:
    """Preprocess this rank's share of every case into the cache (atomic writes; ranks share the work)."""
    from rich.progress import Progress

    jobs = [(ds, case) for ds in datasets for case in ds.cases][rank::world_size]
    with Progress(console=console, transient=True) as bar:
        for ds, case in bar.track(jobs, description="preprocessing"):
            ds.cache.get(case)


class _TrainProgress:
    """A rich progress bar for the training loop; entering yields the loop's callback."""

    def __init__(self, console: Any, steps: int) -> None:
        from ._progress import progress_bar

        self.bar = progress_bar(
            console,
            "loss {task.fields[loss]}",
            "{task.fields[speed]} vol/s",
            "{task.fields[val]}",
            transient=False,
        )
        self.task = self.bar.add_task("pretrain", total=steps, loss="-", speed="-", val="")

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, report: Any) -> None:
        fields = {"loss": f"{report.loss:.4f}", "speed": f"{report.volumes_per_s:.2f}"}
        if report.val_dice:
            fields["val"] = f"val Dice {sum(report.val_dice.values()) / len(report.val_dice):.3f}"
        self.bar.update(self.task, completed=report.step, total=report.steps, **fields)
