"""Partial-label segmentation loss: sigmoid Dice (+ BCE) over the structures each case annotates.

Pre-training assembles datasets that each annotate a different subset of the universal structures.
A structure a case does not annotate is *unknown*, not background, so its channel must not be
penalised: as in the paper's partial-label pre-training, the loss of each sample is computed only
over the structures it annotates.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn

from ..errors import ConfigError


class PartialLabelLoss(nn.Module):
    """Soft Dice per (sample, structure) plus optional BCE, averaged over annotated pairs only.

    Each output channel is an independent sigmoid. For every pair ``(b, s)`` the loss is
    ``dice_weight * dice[b, s] + bce_weight * bce[b, s]`` where ``dice`` is MONAI's
    ``DiceLoss(sigmoid=True, reduction="none")`` and ``bce`` is the voxel-mean of
    ``BCEWithLogitsLoss``. (MONAI's ``DiceCELoss(sigmoid=True)`` is not used: with more than one
    channel its CE term is a softmax cross-entropy, which would couple the independent structures.)
    The result is the mean over the pairs with ``annotated[b, s]`` true.

    Smoothing: ``smooth`` is added to both numerator and denominator of the Dice
    ``1 - (2 I + smooth) / (P + G + smooth)``. When an annotated structure is absent from a crop
    (``G = 0``) this is ``1 - smooth / (P + smooth)``: zero for an empty prediction and rising with
    the predicted mass ``P``, so the crop teaches "nothing here" with a usable gradient (with
    MONAI's default 1e-5 the loss would saturate at 1 and its gradient would vanish).

    A batch in which nothing is annotated yields a loss of exactly zero whose gradient is zero
    (never NaN), so it can take part in a DDP step.

    Args:
        dice_weight: Weight of the Dice term (>= 0).
        bce_weight: Weight of the BCE term (>= 0); 0 disables it.
        smooth: Dice smoothing term (> 0).

    Raises:
        ConfigError: on negative weights, both weights zero, or a non-positive ``smooth``.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight <= 0:
            raise ConfigError(
                f"loss weights must be non-negative with a positive sum, got dice={dice_weight} bce={bce_weight}"
            )
        if smooth <= 0:
            raise ConfigError(f"Dice smoothing must be positive, got {smooth}")
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
        self.bce = nn.BCEWithLogitsLoss(reduction="none")

    def per_structure(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unmasked loss of every (sample, structure) pair.

        Args:
            logits: ``[B, S, *spatial]`` raw network outputs.
            target: ``[B, S, *spatial]`` binary masks.

        Returns:
            ``[B, S]`` float32 losses.
        """
        logits = logits.float()
        target = target.to(logits.dtype)
        loss = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target).flatten(2).squeeze(2)
        if self.bce_weight:
            loss = loss + self.bce_weight * self.bce(logits, target).flatten(2).mean(2)
        return loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """Mean loss over annotated (sample, structure) pairs.

        Args:
            logits: ``[B, S, *spatial]`` raw network outputs.
            target: ``[B, S, *spatial]`` binary masks (values of unannotated channels are ignored).
            annotated: ``[B, S]`` bool, which structures each sample annotates.

        Returns:
            A scalar tensor; zero (with zero gradient) when nothing is annotated.

        Raises:
            ValueError: if the shapes disagree.
        """
        if logits.shape != target.shape or annotated.shape != logits.shape[:2]:
            raise ValueError(
                f"shape mismatch: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                f"annotated {tuple(annotated.shape)}"
            )
        mask = annotated.to(device=logits.device, dtype=torch.bool)
        per_pair = self.per_structure(logits, target)
        masked = torch.where(mask, per_pair, torch.zeros_like(per_pair))
        return masked.sum() / mask.sum().clamp(min=1)
