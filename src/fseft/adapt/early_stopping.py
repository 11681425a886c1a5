"""Early stopping on a plateau of the moving-average loss (the paper's few-shot rule)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError


class PlateauStopper:
    """Stop when the moving average of a loss stops improving.

    After every epoch, :meth:`update` receives that epoch's loss. With ``ma`` the ``window``-epoch
    moving average, training stops once the best ``ma`` of the last ``patience`` epochs is less than
    ``min_delta`` below the best ``ma`` before them. Defaults: a 10-epoch average that improves by less
    than 1e-3 over 20 epochs.

    Args:
        window: Epochs in the moving average (>= 1).
        patience: Epochs over which an improvement of ``min_delta`` is required (>= 1).
        min_delta: Smallest improvement that counts (>= 0).

    Raises:
        ConfigError: on out-of-range values.
    """

    def __init__(self, window: int = 10, patience: int = 20, min_delta: float = 1e-3) -> None:
        if window < 1 or patience < 1 or min_delta < 0:
            raise ConfigError(
                f"early stopping needs window >= 1, patience >= 1, min_delta >= 0; "
                f"got {window}, {patience}, {min_delta}"
            )
        self.window = int(window)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.losses: list[float] = []
        self.averages: list[float] = []

    def update(self, loss: float) -> bool:
        """Record one epoch's loss.

        Args:
            loss: The monitored loss of the epoch just finished (a non-finite loss stops at once).

        Returns:
            True when training should stop now.
        """
        self.losses.append(float(loss))
        if not math.isfinite(loss):
            return True
        if len(self.losses) >= self.window:
            self.averages.append(float(np.mean(self.losses[-self.window :])))
        if len(self.averages) <= self.patience:
            return False
        before = min(self.averages[: -self.patience])
        recent = min(self.averages[-self.patience :])
        return before - recent < self.min_delta


__all__ = ["PlateauStopper"]
