"""The partial-label pre-training loop (single process or DDP under ``torchrun``), exactly resumable.

The loop takes a model and case datasets by interface: a model maps ``[B, 1, *roi]`` to
``[B, S, *roi]`` logits; a case dataset has ``len`` and ``__getitem__`` returning a sample dict
(or a list of crop dicts) with ``image``, ``label`` (S channels) and ``annotated``. Progress is
reported through a callback (rank 0 only); files are written by rank 0 only. Resuming a multi-node
run needs ``out_dir`` on storage every node can read (each rank restores its own RNG state).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import to_dict
from ..errors import ConfigError, TrainingError
from ..runtime import DistContext, autocast, capture_rng_state, resolve_amp, restore_rng_state
from .checkpointing import (
    CHECKPOINT_NAME,
    LOG_NAME,
    TrainLog,
    check_resume_config,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .losses import PartialLabelLoss
from .sampling import BalancedSampler, StepBatches
from .schedule import warmup_cosine
from .validation import validation_dice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """What the loop reports after each step.

    Args:
        step: Steps completed.
        steps: Total steps.
        loss: Training loss of this step (mean over ranks).
        lr: Learning rate used by this step.
        volumes_per_s: Volumes (all ranks) per second since the loop (re)started.
        val_dice: Per-structure validation Dice, on the steps where validation ran.
        elapsed_s: Wall-clock seconds of training (validation included) since step 0, summed over
            resumed runs: the x axis of a learning curve in compute time.
    """

    step: int
    steps: int
    loss: float
    lr: float
    volumes_per_s: float
    val_dice: dict[str, float] | None = None
    elapsed_s: float = 0.0


@dataclass
class TrainResult:
    """The outcome of :func:`pretrain`.

    Args:
        model: The trained model (unwrapped from DDP).
        step: Steps completed.
        resumed_from: Step the run resumed from (0 for a fresh run).
        val_dice: The last validation Dice per structure (empty without validation data).
        elapsed_s: Wall-clock seconds of training since step 0, summed over resumed runs.
    """

    model: nn.Module
    step: int
    resumed_from: int = 0
    val_dice: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0


def pretrain(
    model: nn.Module,
    sources: Sequence[Any],
    structures: Sequence[str],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    ctx: DistContext | None = None,
    weights: Sequence[float] | None = None,
    val_samples: Sequence[dict[str, Any]] = (),
    roi: Sequence[int] = (96, 96, 96),
    resume: bool = False,
    run_key: dict[str, Any] | None = None,
    callback: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Pre-train ``model`` with the partial-label loss on dataset-balanced batches.

    Every step draws ``cfg.batch_size`` cases per rank (:class:`BalancedSampler`), with crop and
    augmentation randomness seeded from ``(seed, step, rank)``; AdamW with a warm-up cosine
    schedule; optional GPU mixed precision. Every ``cfg.ckpt_every`` steps and at the end, rank 0
    writes ``out_dir/checkpoint.pt``; with ``resume`` an existing checkpoint is restored and the run
    continues exactly where it stopped (same final weights as an uninterrupted run).

    Args:
        model: Maps ``[B, 1, *roi]`` to ``[B, S, *roi]`` logits. Initialise it from ``cfg.seed``.
        sources: One case dataset per training dataset (see module docstring).
        structures: Names of the ``S`` output channels.
        cfg: Training configuration.
        out_dir: Where rank 0 writes ``checkpoint.pt`` and ``train_log.jsonl``.
        ctx: Distributed context (default: single process on CPU).
        weights: Sampling weight of each source (default: uniform).
        val_samples: Held-out eval-mode samples for periodic validation Dice.
        roi: Sliding-window size of validation.
        resume: Continue from ``out_dir/checkpoint.pt`` when it exists.
        run_key: Extra JSON-able settings (model, data) a resumed run must match.
        callback: Called on rank 0 after every step.

    Returns:
        The trained model and final statistics.

    Raises:
        CheckpointError: when resuming from a checkpoint that is unreadable or from another setup.
        TrainingError: the loss is not finite (no checkpoint is written for the failed steps).
        ConfigError: on inconsistent sources, weights or settings, or an existing checkpoint in
            ``out_dir`` without ``resume``.
    """
    ctx = ctx or DistContext()
    out = Path(out_dir)
    amp = resolve_amp(cfg.amp, ctx.device)
    sampler = BalancedSampler([len(s) for s in sources], weights, cfg.seed, cfg.batch_size, ctx.world_size)
    batches = StepBatches(sources, sampler, ctx.rank, cfg.steps)
    key = {"train": cfg.resume_key(), **to_dict(run_key or {})}
    train_log = TrainLog(out / LOG_NAME)

    model.to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    ckpt_path = out / CHECKPOINT_NAME
    state = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if state is not None:
        check_resume_config(ckpt_path, state["config"], key)
        sampler.load_state_dict(state["sampler"])
        model.load_state_dict(state["model"])
    elif resume:
        log.info("no checkpoint in %s: starting from step 0", out)
    elif ckpt_path.is_file():
        raise ConfigError(
            f"{ckpt_path} exists: pass --resume to continue that run, or use another output folder"
        )
    net: nn.Module = model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    loss_fn = PartialLabelLoss(cfg.dice_weight, cfg.bce_weight, cfg.dice_smooth)

    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][ctx.rank])
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt_path, start)
    if ctx.is_main:
        train_log.rewind(start)
    val_dice: dict[str, float] = dict(state.get("val_dice", {})) if state is not None else {}
    elapsed_before = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0

    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, cfg.steps),
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        generator=torch.Generator(),  # keeps the loader from drawing on the global RNG at (re)start
    )
    net.train()
    t0 = time.perf_counter()
    step = start
    elapsed = elapsed_before
    for step_index, batch in zip(range(start, cfg.steps), loader, strict=False):
        lr = optimizer.param_groups[0]["lr"]
        loss = _train_step(net, batch, loss_fn, optimizer, scaler, ctx, amp, cfg.channels_last)
        scheduler.step()
        step = step_index + 1
        if ctx.distributed:  # gloo has no AVG
            torch.distributed.all_reduce(loss)
            loss /= ctx.world_size
        if not torch.isfinite(loss):  # the same on every rank: they all stop here
            raise TrainingError(
                f"pre-training stopped at step {step}: the loss is {float(loss)} (not finite); nothing was "
                f"written for this run since its last checkpoint; try a lower --lr or check the data"
            )
        report_val = None
        if val_samples and (step == cfg.steps or (cfg.val_every and step % cfg.val_every == 0)):
            val_dice = validation_dice(
                model, val_samples, structures, roi, ctx, amp, cfg.sw_batch_size, cfg.sw_overlap
            )
            report_val = val_dice
        seconds = time.perf_counter() - t0
        speed = (step - start) * cfg.batch_size * ctx.world_size / seconds
        elapsed = elapsed_before + seconds
        report = StepReport(step, cfg.steps, float(loss), lr, speed, report_val, elapsed)
        if ctx.is_main:
            _log_step(train_log, report, cfg)
            if callback is not None:
                callback(report)
        if step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            _checkpoint(ckpt_path, model, optimizer, scheduler, scaler, sampler, step, key, val_dice, elapsed, ctx)
    return TrainResult(model=model, step=step, resumed_from=start, val_dice=val_dice, elapsed_s=elapsed)


def _train_step(
    net: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: PartialLabelLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ctx: DistContext,
    amp: str,
    channels_last: bool = False,
) -> torch.Tensor:
    """One forward/backward/update; returns the detached loss."""
    non_blocking = ctx.device.type == "cuda"
    image = batch["image"].to(ctx.device, non_blocking=non_blocking)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = batch["label"].to(ctx.device, non_blocking=non_blocking)
    annotated = batch["annotated"].to(ctx.device, non_blocking=non_blocking)
    optimizer.zero_grad(set_to_none=True)
    with autocast(ctx.device, amp):
        logits = net(image)
    loss = loss_fn(logits, label, annotated)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _log_step(train_log: TrainLog, report: StepReport, cfg: TrainConfig) -> None:
    record: dict[str, Any] = {}
    if report.step % cfg.log_every == 0 or report.step == cfg.steps:
        record.update(loss=report.loss, lr=report.lr, volumes_per_s=round(report.volumes_per_s, 4))
    if report.val_dice is not None:
        values = list(report.val_dice.values())
        record.update(val_dice=report.val_dice, val_mean=sum(values) / len(values) if values else None)
    if record:
        train_log.append(
            {"step": report.step, **record, "elapsed_s": round(report.elapsed_s, 1), "time": round(time.time(), 3)}
        )


def _checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    sampler: BalancedSampler,
    step: int,
    key: dict[str, Any],
    val_dice: dict[str, float],
    elapsed_s: float,
    ctx: DistContext,
) -> None:
    """Gather every rank's RNG state and let rank 0 write the checkpoint."""
    rng = capture_rng_state()
    rngs: list[Any] = [rng]
    if ctx.distributed:
        rngs = [None] * ctx.world_size
        torch.distributed.all_gather_object(rngs, rng)
    if not ctx.is_main:
        return
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rngs,
        "sampler": sampler.state_dict(),
        "config": key,
        "val_dice": dict(val_dice),
        "elapsed_s": elapsed_s,
    }
    save_checkpoint(path, state)
    log.debug("checkpoint at step %d -> %s", step, path)
