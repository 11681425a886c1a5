"""Partial-label loss: masking, empty targets, zero-annotation batches, independence of channels."""

from __future__ import annotations

import pytest
import torch

from fseft.errors import ConfigError
from fseft.training.losses import PartialLabelLoss


def _batch(b: int = 2, s: int = 3, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, n, n, n, generator=g)
    target = (torch.rand(b, s, n, n, n, generator=g) > 0.7).float()
    return logits, target


def test_unannotated_channels_do_not_affect_loss_or_gradient() -> None:
    logits, target = _batch()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    loss_fn = PartialLabelLoss(bce_weight=1.0)
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, target, annotated)
    loss.backward()
    assert x.grad is not None
    for b in range(2):
        for s in range(3):
            norm = x.grad[b, s].abs().sum().item()
            assert (norm > 0) == bool(annotated[b, s])
    changed = logits.clone()
    changed[0, 1] = 50.0  # wildly wrong on an unannotated channel
    changed[1, 0] = -50.0
    target2 = target.clone()
    target2[1, 2] = 1 - target2[1, 2]  # flip the (unknown) reference of an unannotated channel
    assert torch.allclose(loss_fn(changed, target2, annotated), loss.detach())


def test_loss_is_mean_over_annotated_pairs() -> None:
    logits, target = _batch()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    loss_fn = PartialLabelLoss(dice_weight=1.0, bce_weight=0.5)
    per_pair = loss_fn.per_structure(logits, target)
    assert per_pair.shape == (2, 3)
    expected = per_pair[annotated].mean()
    assert torch.allclose(loss_fn(logits, target, annotated), expected)
    # the Dice part by hand: 1 - (2I + 1) / (P + G + 1)
    p = torch.sigmoid(logits[0, 0])
    g = target[0, 0]
    dice = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0], g)
    assert torch.allclose(per_pair[0, 0], dice + 0.5 * bce, atol=1e-5)


def test_channels_are_independent_sigmoids() -> None:
    logits, target = _batch(b=1, s=2)
    loss_fn = PartialLabelLoss(bce_weight=1.0)
    before = loss_fn.per_structure(logits, target)[0, 0]
    logits[0, 1] += 10.0  # a softmax CE would change channel 0's loss
    after = loss_fn.per_structure(logits, target)[0, 0]
    assert torch.allclose(before, after)


def test_nothing_annotated_gives_zero_loss_and_zero_gradient() -> None:
    logits, target = _batch()
    x = logits.clone().requires_grad_(True)
    loss = PartialLabelLoss()(x, target, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() == 0


def test_absent_structure_pushes_predictions_to_zero() -> None:
    target = torch.zeros(1, 1, 8, 8, 8)
    annotated = torch.ones(1, 1, dtype=torch.bool)
    loss_fn = PartialLabelLoss(bce_weight=0.0)
    losses = []
    for level in (4.0, 0.0, -4.0, -30.0):
        x = torch.full_like(target, level).requires_grad_(True)
        loss = loss_fn(x, target, annotated)
        loss.backward()
        assert torch.isfinite(loss)
        if level > -30.0:
            assert x.grad is not None and (x.grad > 0).all()  # lowering the logits lowers the loss
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True)
    assert losses[0] > 0.9 and losses[-1] < 1e-6


def test_perfect_prediction_has_near_zero_dice() -> None:
    _, target = _batch(b=1, s=2)
    logits = (target * 2 - 1) * 30.0
    loss = PartialLabelLoss(bce_weight=0.0)(logits, target, torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() < 1e-4


def test_bad_configuration_and_shapes_raise() -> None:
    with pytest.raises(ConfigError, match="positive sum"):
        PartialLabelLoss(dice_weight=0.0, bce_weight=0.0)
    with pytest.raises(ConfigError, match="smoothing"):
        PartialLabelLoss(smooth=0.0)
    logits, target = _batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        PartialLabelLoss()(logits, target[:, :2], torch.ones(2, 2, dtype=torch.bool))
