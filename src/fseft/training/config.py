"""The pre-training configuration (one frozen dataclass, validated once)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..runtime import AMP_MODES


@dataclass(frozen=True)
class TrainConfig:
    """How the foundation model is pre-trained (optimiser, schedule, loss, cadence).

    Args:
        steps: Optimiser steps in total.
        batch_size: Volumes per process per step (each yields ``num_samples`` crops).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup: Linear warm-up steps before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        dice_weight: Weight of the partial-label soft Dice term.
        bce_weight: Weight of the partial-label BCE term (0 disables it).
        dice_smooth: Smoothing of the soft Dice (see :class:`~fseft.training.losses.PartialLabelLoss`).
        amp: Mixed precision on GPU: ``"off"``, ``"bf16"`` or ``"fp16"`` (with a GradScaler); ignored
            with a warning on CPU.
        seed: Seed of model initialisation, case sampling and crop/augmentation randomness.
        val_every: Validate every this many steps (0: only after the last step); needs held-out cases.
        ckpt_every: Write the resumable checkpoint every this many steps (0: only after the last step).
        log_every: Append a training record to ``train_log.jsonl`` every this many steps.
        num_workers: Data-loader worker processes (results do not depend on it).
        sw_batch_size: Windows per forward pass in sliding-window validation.
        sw_overlap: Overlap of sliding windows in validation, in ``[0, 1)``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        channels_last: Train in the ``channels_last_3d`` memory format (faster convolutions with
            oneDNN on CPU for some backbones: measure with ``perf/train_step.py``). Not part of
            the resume key: the result differs only by float rounding.
    """

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup: int = 0
    min_lr_ratio: float = 0.0
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    dice_smooth: float = 1.0
    amp: str = "off"
    seed: int = 0
    val_every: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    num_workers: int = 0
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    device: str = "auto"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"warmup must be in [0, steps), got warmup={self.warmup}, steps={self.steps}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("lr must be > 0, weight_decay >= 0 and min_lr_ratio in [0, 1]")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown amp mode {self.amp!r}; valid: {list(AMP_MODES)}")
        if min(self.val_every, self.ckpt_every, self.num_workers) < 0 or self.log_every < 1:
            raise ConfigError("val_every, ckpt_every, num_workers must be >= 0 and log_every >= 1")
        if self.sw_batch_size < 1 or not 0 <= self.sw_overlap < 1:
            raise ConfigError("sw_batch_size must be >= 1 and sw_overlap in [0, 1)")

    def resume_key(self) -> dict[str, object]:
        """The fields a resumed run must share with the checkpoint to continue exactly."""
        keys = ("steps", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "dice_weight",
                "bce_weight", "dice_smooth", "amp", "seed")  # fmt: skip
        return {k: getattr(self, k) for k in keys}
