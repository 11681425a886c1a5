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

    from ..outputs import plan_outputs
    from ..runtime import distributed_session
    from ..training.api import PretrainJob, prepare_pretraining
    from ..training.checkpointing import CHECKPOINT_NAME, LOG_NAME

    assembly_cfg, preprocess, train = _configs(args)
    job = PretrainJob(
        assembly=assembly_cfg, preprocess=preprocess, train=train, out=args.out, arch=args.model_arch,
        feature_size=args.feature_size, grad_checkpoint=args.grad_checkpoint, cache_dir=args.cache_dir,
        resume=args.resume,
    )  # fmt: skip
    out: Path = args.out
    plan_outputs([out / CHECKPOINT_NAME, out / "model.pt", out / LOG_NAME], folders=[job.cache_path],
                 overwrite=args.resume, hint="pass --resume to continue that run, or use another output folder")  # fmt: skip
    with distributed_session(train.device) as ctx:
        console = Console(stderr=True, quiet=not ctx.is_main)
        if not ctx.is_main:  # rank 0 speaks for the job
            logging.getLogger("fseft").setLevel(logging.WARNING)
        with _CacheProgress(console) as on_cache:
            prepared = prepare_pretraining(job, ctx, on_cache=on_cache)
        console.print(prepared.summary)
        with _TrainProgress(console, train.steps) as callback:
            outcome = prepared.run(extra={"command": _command_line(args)}, callback=callback)
        if outcome.path is not None:
            console.print(f"wrote {outcome.path}")
            val_dice = outcome.result.val_dice
            if val_dice:
                mean = sum(val_dice.values()) / len(val_dice)
                console.print(f"validation Dice (mean over {len(val_dice)} structures): {mean:.3f}")
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


class _CacheProgress:
    """A transient rich bar while this rank preprocesses its share of the cases; yields the callback."""

    def __init__(self, console: Any) -> None:
        from rich.progress import Progress

        self.bar = Progress(console=console, transient=True)
        self.task = self.bar.add_task("preprocessing", total=None)

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)


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
