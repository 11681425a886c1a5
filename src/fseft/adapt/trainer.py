"""The few-shot trainer: naive (backbone on every crop) and cached (crops of frozen features) paths.

Paper protocol (Silva-Rodríguez, Dolz & Ben Ayed, MedIA 2025, Sec. 4): each step takes one support
volume and draws ``num_samples`` ROI crops centred on foreground / background voxels 1:1; soft Dice
loss; AdamW without weight decay at the method's learning rate (a head with a row that starts new
at no less than 1e-2, :meth:`AdaptedModel.head_lr`), one epoch of linear warm-up then cosine
decay; at most 200 epochs (one epoch = one pass over the k support volumes) with early stopping
when the 10-epoch moving average of the loss improves by less than 1e-3 over 20 epochs.

Both paths draw identical crop coordinates for a given seed (:class:`~fseft.adapt.support.CropSampler`)
and use the same loss, so with the same seed they reach the same Dice up to the small difference
between features of a crop computed alone and sliding-window features of the whole volume. No
augmentation is applied: flipping an image is not flipping its features, so the paths would diverge.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.metrics import compute_dice

from ..errors import ConfigError, TrainingError
from ..models.feature_store import FeatureStore
from ..models.predict import sliding_window_logits
from ..training.schedule import warmup_cosine
from .early_stopping import PlateauStopper
from .feature_cache import FeatureCache
from .model import AdaptedModel, check_task
from .support import CropSampler, SupportVolume, crop

logger = logging.getLogger(__name__)

FEATURE_CACHE_MODES = ("auto", "on", "off")
MONITORS = ("auto", "train", "val")


@dataclass(frozen=True)
class AdaptTrainConfig:
    """How a method is trained on the support set (paper defaults).

    Args:
        max_epochs: Upper bound on epochs (an epoch is one pass over the k support volumes).
        max_steps: Upper bound on optimiser steps (one support volume each), whatever k: a fixed
            compute budget per adaptation (:meth:`epochs_for`); None: ``max_epochs * k`` steps.
        num_samples: Random ROI crops per volume per step.
        pos: Weight of crops centred on a target voxel.
        neg: Weight of crops centred on a background (body) voxel.
        weight_decay: AdamW weight decay (0 in the paper).
        warmup_epochs: Epochs of linear warm-up before the cosine decay.
        dice_smooth: Smoothing of MONAI's ``DiceLoss`` (numerator and denominator). The Dice is
            computed over all crops of a step together (``batch=True``), so background-only crops
            penalise false positives instead of giving a degenerate per-crop Dice.
        early_stopping: Stop on a plateau of the monitored loss (else always ``max_epochs``).
        es_window: Epochs of the moving average.
        es_patience: Epochs over which the moving average must improve by ``es_min_delta``.
        es_min_delta: Smallest improvement that counts.
        monitor: Loss to watch: ``"train"``, ``"val"`` (needs a validation case) or ``"auto"`` (val
            when a validation case is given, else train).
        feature_cache: ``"auto"`` (cache frozen features when the method is black-box), ``"on"``
            (require it: error for methods that train the backbone) or ``"off"`` (naive path).
        feature_overlap: Sliding-window overlap when computing cached features.
        feature_memory_gb: Cached features stay in memory up to this many GiB; the rest go to
            memory-mapped files.
        feature_dir: Folder for those files (default: the system temp folder); removed afterwards.
        sw_batch_size: Windows per forward pass when computing features and validating.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: on out-of-range values or unknown modes.
    """

    max_epochs: int = 200
    max_steps: int | None = None
    num_samples: int = 6
    pos: float = 1.0
    neg: float = 1.0
    weight_decay: float = 0.0
    warmup_epochs: int = 1
    dice_smooth: float = 1e-5
    early_stopping: bool = True
    es_window: int = 10
    es_patience: int = 20
    es_min_delta: float = 1e-3
    monitor: str = "auto"
    feature_cache: str = "auto"
    feature_overlap: float = 0.5
    feature_memory_gb: float = 8.0
    feature_dir: str | None = None
    sw_batch_size: int = 2
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.num_samples < 1 or self.warmup_epochs < 0:
            raise ConfigError("max_epochs and num_samples must be >= 1 and warmup_epochs >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise ConfigError(f"pos/neg must be non-negative with a positive sum, got {self.pos}, {self.neg}")
        if self.weight_decay < 0 or self.dice_smooth <= 0:
            raise ConfigError("weight_decay must be >= 0 and dice_smooth > 0")
        PlateauStopper(self.es_window, self.es_patience, self.es_min_delta)  # validates the rule
        for name, value, valid in (
            ("monitor", self.monitor, MONITORS),
            ("feature_cache", self.feature_cache, FEATURE_CACHE_MODES),
        ):
            if value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(valid)}")
        if not 0 <= self.feature_overlap < 1 or self.feature_memory_gb < 0 or self.sw_batch_size < 1:
            raise ConfigError("feature_overlap must be in [0, 1), feature_memory_gb >= 0, sw_batch_size >= 1")

    def epochs_for(self, k: int) -> int:
        """Epochs of an adaptation on ``k`` support volumes: ``max_epochs``, or fewer when ``max_steps``
        caps the steps (rounded up to whole epochs, so every volume is seen equally often)."""
        if self.max_steps is None:
            return self.max_epochs
        return max(1, min(self.max_epochs, math.ceil(self.max_steps / max(1, k))))


@dataclass(frozen=True)
class EpochReport:
    """What the progress callback receives after each epoch (and while caching features).

    Args:
        stage: ``"features"`` (caching: ``epoch`` volumes of ``total`` done) or ``"train"``.
        epoch: Epochs (or volumes) done.
        total: ``max_epochs`` (or the number of volumes).
        loss: Mean training loss of the epoch (``nan`` while caching).
        val_loss: Validation loss of the epoch, if a validation case is used.
        elapsed_s: Seconds since the stage started.
        plateau: The early-stopping rule fired at this epoch: training stops after the callbacks,
            unless the epoch hook starts a new training phase (the rule then restarts).
    """

    stage: str
    epoch: int
    total: int
    loss: float = float("nan")
    val_loss: float | None = None
    elapsed_s: float = 0.0
    plateau: bool = False


#: Called after each epoch (and each cached volume) to show progress.
Progress = Callable[[EpochReport], None]


class EpochHook(Protocol):
    """Something that acts on training after each epoch (the batch-mode transductive constraint)."""

    def after_epoch(self, report: EpochReport) -> bool:
        """Act after an epoch; return True to start a new phase (early stopping starts over)."""
        ...


@dataclass
class FitResult:
    """What :func:`fit` did.

    Args:
        path: ``"naive"`` or ``"cached"``.
        loss_curve: Mean training loss per epoch.
        val_loss_curve: Validation loss per epoch (empty without a validation case).
        epochs_run: Epochs trained.
        stop_reason: ``"plateau"``, ``"val-plateau"``, ``"max-epochs"`` or ``"nothing-to-train"``.
        lr: Peak learning rate used.
        feature_time_s: Seconds spent caching features (0 on the naive path).
        train_time_s: Seconds spent in the epochs.
    """

    path: str
    loss_curve: list[float] = field(default_factory=list)
    val_loss_curve: list[float] = field(default_factory=list)
    epochs_run: int = 0
    stop_reason: str = "max-epochs"
    lr: float = 0.0
    feature_time_s: float = 0.0
    train_time_s: float = 0.0


def make_loss(task: str, smooth: float = 1e-5) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Soft Dice loss on logits and an index-map target ``[N, 1, *spatial]``.

    ``binary``: MONAI ``DiceLoss(sigmoid=True)`` against one channel per structure (``label == i + 1``);
    ``multiclass``: ``DiceLoss(softmax=True, to_onehot_y=True)`` with background at channel 0.
    Both pool the crops of a step (``batch=True``).

    Raises:
        ConfigError: on an unknown task.
    """
    check_task(task)
    if task == "multiclass":
        dice = DiceLoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)
        return lambda logits, label: dice(logits, label.long())
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)
    return lambda logits, label: dice(logits, _channels(label, logits.shape[1]))


def _channels(label: torch.Tensor, n: int) -> torch.Tensor:
    values = torch.arange(1, n + 1, device=label.device).view(1, n, *([1] * (label.ndim - 2)))
    return (label.long() == values).float()


def predict_masks(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Binary masks ``[N, S, *spatial]`` of the target structures from logits.

    ``binary``: ``sigmoid > 0.5`` per channel; ``multiclass``: argmax, channels 1..C-1.
    """
    if task == "multiclass":
        index = logits.argmax(1, keepdim=True)
        return _channels(index, logits.shape[1] - 1)
    return (logits > 0).float()


def resolve_path(adapted: AdaptedModel, mode: str) -> str:
    """``"cached"`` or ``"naive"`` for ``feature_cache`` mode ``mode``.

    The cached path needs a black-box method (``adapted.black_box``: decoder and bottleneck frozen)
    whose base has no trainable parameter.

    Raises:
        ConfigError: when ``mode`` is ``"on"`` but the method trains part of the backbone.
    """
    base_trains = any(p.requires_grad for p in adapted.base.parameters())
    frozen = bool(adapted.black_box) and not base_trains
    if mode == "on" and not frozen:
        raise ConfigError(
            "feature caching needs a black-box method with a frozen decoder and bottleneck; "
            "this configuration trains the backbone (use feature_cache='auto' or 'off')"
        )
    return "cached" if frozen and mode != "off" else "naive"


def fit(
    adapted: AdaptedModel,
    volumes: Sequence[SupportVolume],
    cfg: AdaptTrainConfig,
    *,
    lr: float,
    seed: int,
    path: str,
    validation: SupportVolume | None = None,
    device: torch.device | None = None,
    progress: Progress | None = None,
    hook: EpochHook | None = None,
    store: FeatureStore | None = None,
) -> FitResult:
    """Train ``adapted`` (an :class:`~fseft.adapt.model.AdaptedModel`) on the support volumes.

    Args:
        adapted: The model with its method applied (trainable parameters have ``requires_grad``).
        volumes: Preprocessed support volumes; labels index the model's target structures.
        cfg: Training configuration.
        lr: Peak learning rate.
        seed: Seeds torch and every crop draw.
        path: ``"naive"`` or ``"cached"`` (see :func:`resolve_path`).
        validation: Held-out volume whose loss is recorded each epoch (and monitored if asked).
        device: Where to train (default: the model's device).
        progress: Called after every epoch (and every cached volume).
        hook: Called after every epoch, before ``progress``; may start a new training phase.
        store: On the cached path, reuse the frozen backbone's windows of each support volume from
            (and keep them in) this store.

    Returns:
        The :class:`FitResult`; ``adapted`` is trained in place and left in eval mode.

    Raises:
        ConfigError: on an empty support, ``monitor="val"`` without a validation volume, or an unknown path.
        TrainingError: the training or validation loss is not finite (the model must not be saved).
    """
    if not volumes:
        raise ConfigError("the support set is empty")
    if path not in ("naive", "cached"):
        raise ConfigError(f"unknown training path {path!r}; choose naive or cached")
    monitor = cfg.monitor if cfg.monitor != "auto" else ("val" if validation is not None else "train")
    if monitor == "val" and validation is None:
        raise ConfigError("early stopping on the validation loss needs a validation case")
    device = device or next(adapted.parameters()).device
    task: str = adapted.task
    roi = tuple(int(r) for r in adapted.base.config.preprocess.roi)
    result = FitResult(path=path, lr=float(lr))
    params = [p for p in adapted.parameters() if p.requires_grad]
    if not params:
        adapted.eval()
        result.stop_reason = "nothing-to-train"
        return result
    torch.manual_seed(seed)
    samplers = [CropSampler(v.label, v.image, roi, cfg.num_samples, cfg.pos, cfg.neg) for v in volumes]
    cache: FeatureCache | None = None
    if path == "cached":
        start = time.perf_counter()
        images = list(v.image for v in volumes) + ([validation.image] if validation is not None else [])
        adapted.eval()
        cache = FeatureCache.build(
            adapted.features,
            images,
            roi,
            overlap=cfg.feature_overlap,
            sw_batch_size=cfg.sw_batch_size,
            device=device,
            memory_budget_bytes=int(cfg.feature_memory_gb * 2**30),
            directory=cfg.feature_dir,
            store=store,
            fingerprint=adapted.base_fingerprint,
            progress=None if progress is None else lambda i, n: progress(
                EpochReport("features", i, n, elapsed_s=time.perf_counter() - start)
            ),
        )  # fmt: skip
        result.feature_time_s = time.perf_counter() - start
    try:
        _epochs(
            adapted,
            volumes,
            samplers,
            cache,
            cfg,
            lr,
            seed,
            roi,
            task,
            monitor,
            validation,
            device,
            progress,
            hook,
            result,
        )
    finally:
        if cache is not None:
            cache.close()
        adapted.eval()
    return result


def _epochs(
    adapted: AdaptedModel,
    volumes: Sequence[SupportVolume],
    samplers: Sequence[CropSampler],
    cache: FeatureCache | None,
    cfg: AdaptTrainConfig,
    lr: float,
    seed: int,
    roi: tuple[int, ...],
    task: str,
    monitor: str,
    validation: SupportVolume | None,
    device: torch.device,
    progress: Progress | None,
    hook: EpochHook | None,
    result: FitResult,
) -> None:
    k = len(volumes)
    optimizer = torch.optim.AdamW(adapted.param_groups(lr), lr=lr, weight_decay=cfg.weight_decay)
    epochs = cfg.epochs_for(k)
    total = epochs * k
    scheduler = warmup_cosine(optimizer, min(cfg.warmup_epochs * k, total - 1), total)
    loss_fn = make_loss(task, cfg.dice_smooth)
    stopper = PlateauStopper(cfg.es_window, cfg.es_patience, cfg.es_min_delta)
    start = time.perf_counter()
    for epoch in range(epochs):
        adapted.train()
        losses = []
        for i in np.random.default_rng([seed, epoch]).permutation(k):
            i = int(i)
            starts = samplers[i].draw(seed, epoch, i)
            label = torch.stack([crop(volumes[i].label, s, roi) for s in starts]).to(device)
            if cache is not None:
                logits = adapted.forward_features(cache.crops(i, starts, roi).to(device))
            else:
                logits = adapted(torch.stack([crop(volumes[i].image, s, roi) for s in starts]).to(device))
            loss = loss_fn(logits, label)
            _require_finite(float(loss.detach()), "training", epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        result.loss_curve.append(float(np.mean(losses)))
        result.epochs_run = epoch + 1
        val_loss = None
        if validation is not None:
            val_loss = validation_loss(adapted, validation, task, cfg, device, cache, k)
            _require_finite(val_loss, "validation", epoch)
            result.val_loss_curve.append(val_loss)
        result.train_time_s = time.perf_counter() - start
        watched = val_loss if monitor == "val" and val_loss is not None else result.loss_curve[-1]
        plateau = stopper.update(watched) and cfg.early_stopping
        report = EpochReport(
            "train", epoch + 1, epochs, result.loss_curve[-1], val_loss, result.train_time_s, plateau
        )
        restart = hook.after_epoch(report) if hook is not None else False
        if progress is not None:
            progress(report)
        if restart:  # a new phase: the plateau rule starts over
            stopper = PlateauStopper(cfg.es_window, cfg.es_patience, cfg.es_min_delta)
            plateau = False
        if plateau:
            result.stop_reason = "val-plateau" if monitor == "val" else "plateau"
            return
    result.stop_reason = "max-epochs"


def _require_finite(loss: float, which: str, epoch: int) -> None:
    """Refuse a NaN / infinite loss: the weights it leads to would give silently wrong masks."""
    if not np.isfinite(loss):
        raise TrainingError(
            f"adaptation stopped at epoch {epoch + 1}: the {which} loss is {loss} (not finite), so the "
            "trained weights are unusable and nothing was written; try a lower --lr"
        )


@torch.no_grad()
def validation_loss(
    adapted: AdaptedModel,
    volume: SupportVolume,
    task: str,
    cfg: AdaptTrainConfig,
    device: torch.device,
    cache: FeatureCache | None = None,
    cache_index: int = -1,
) -> float:
    """Soft Dice loss of ``adapted`` on a whole held-out volume (from cached features when given)."""
    adapted.eval()
    if cache is not None:
        logits = adapted.forward_features(cache.volume(cache_index)[None].to(device))
    else:
        logits = volume_logits(adapted, volume.image, cfg.sw_batch_size, device)
    return float(make_loss(task, cfg.dice_smooth)(logits, volume.label[None].to(logits.device)))


@torch.no_grad()
def volume_logits(
    adapted: AdaptedModel,
    image: torch.Tensor,
    sw_batch_size: int = 2,
    device: torch.device | None = None,
    overlap: float = 0.5,
) -> torch.Tensor:
    """Sliding-window logits ``[1, C, X, Y, Z]`` of ``adapted`` over a ``[1, X, Y, Z]`` volume (eval mode)."""
    adapted.eval()
    device = device or next(adapted.parameters()).device
    roi = adapted.base.config.preprocess.roi
    return sliding_window_logits(
        adapted, image[None].to(device), roi, overlap=overlap, sw_batch_size=sw_batch_size
    )


def heldout_dice(
    adapted: AdaptedModel,
    volumes: Sequence[SupportVolume],
    sw_batch_size: int = 2,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Mean Dice per target structure over whole preprocessed volumes (sliding window, thresholded).

    Args:
        adapted: The adapted model (``structures``, ``task`` attributes).
        volumes: Labelled volumes whose index maps use the model's target structures.
        sw_batch_size: Windows per forward pass.
        device: Where to run (default: the model's device).

    Returns:
        ``{structure: mean Dice}``; a structure absent from both prediction and label scores 1.
    """
    structures: Sequence[str] = adapted.structures
    sums = np.zeros(len(structures))
    for volume in volumes:
        logits = volume_logits(adapted, volume.image, sw_batch_size, device)
        pred = predict_masks(logits, adapted.task).cpu()
        ref = _channels(volume.label[None], len(structures))
        sums += compute_dice(pred, ref, include_background=True, ignore_empty=False)[0].double().numpy()
    return {s: float(v / len(volumes)) for s, v in zip(structures, sums, strict=True)}


__all__ = [
    "AdaptTrainConfig",
    "EpochHook",
    "EpochReport",
    "FitResult",
    "Progress",
    "fit",
    "heldout_dice",
    "make_loss",
    "predict_masks",
    "resolve_path",
    "validation_loss",
    "volume_logits",
]
