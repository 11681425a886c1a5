"""Per-structure validation Dice on held-out volumes with sliding-window prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import compute_dice
from torch import nn

from ..models.predict import sliding_window_logits
from ..runtime import DistContext, autocast


def label_channels(label: torch.Tensor, num_structures: int) -> torch.Tensor:
    """``[S, *spatial]`` binary channels from either channels or a ``[1, *spatial]`` index map.

    Args:
        label: A label tensor as eval transforms produce it.
        num_structures: ``S``.

    Returns:
        Float binary channels ``[S, *spatial]``.
    """
    if label.shape[0] == num_structures:  # channels (with S == 1 an index map is the same thing)
        return (label > 0.5).float()
    index = label[0].long()
    return torch.stack([(index == i + 1) for i in range(num_structures)]).float()


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    samples: Sequence[dict[str, Any]],
    structures: Sequence[str],
    roi: Sequence[int],
    ctx: DistContext,
    amp: str = "off",
    sw_batch_size: int = 2,
    overlap: float = 0.25,
) -> dict[str, float]:
    """Mean Dice of each structure over the held-out volumes that annotate it.

    Predictions are ``sigmoid(logits) > 0.5`` of a sliding-window pass over the whole preprocessed
    volume. A structure absent from both prediction and reference scores 1, absent from only one
    scores 0. Under DDP each rank evaluates every ``world_size``-th volume and the sums are reduced,
    so every rank returns the same numbers.

    Args:
        model: Maps ``[B, 1, *roi]`` to ``[B, S, *roi]`` logits (put in eval mode, then back to train).
        samples: Held-out samples with ``image [1, *spatial]``, ``label`` (channels or index map),
            ``annotated bool[S]``.
        structures: Names of the ``S`` output channels.
        roi: Sliding-window size.
        ctx: Distributed context (device, rank, world size).
        amp: Mixed-precision mode (see :func:`fseft.runtime.resolve_amp`).
        sw_batch_size: Windows per forward pass.
        overlap: Window overlap.

    Returns:
        ``{structure: mean Dice}`` for every structure annotated in at least one sample.
    """
    n = len(structures)
    sums = torch.zeros(n, dtype=torch.float64, device=ctx.device)
    counts = torch.zeros(n, dtype=torch.float64, device=ctx.device)
    was_training = model.training
    model.eval()
    for i in range(ctx.rank, len(samples), ctx.world_size):
        sample = samples[i]
        image = torch.as_tensor(sample["image"]).float()[None].to(ctx.device)
        with autocast(ctx.device, amp):
            logits = sliding_window_logits(model, image, roi, overlap=overlap, sw_batch_size=sw_batch_size)
        pred = (logits.float() > 0).float()
        ref = label_channels(torch.as_tensor(sample["label"]).to(ctx.device), n)[None]
        dice = compute_dice(pred, ref, include_background=True, ignore_empty=False)[0].double()
        annotated = torch.as_tensor(sample["annotated"]).bool().to(ctx.device)
        sums += torch.where(annotated, dice, torch.zeros_like(dice))
        counts += annotated.double()
    model.train(was_training)
    if ctx.distributed:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    return {s: float(sums[k] / counts[k]) for k, s in enumerate(structures) if counts[k] > 0}
