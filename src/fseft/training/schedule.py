"""Learning-rate schedule: linear warm-up then cosine decay, counted in optimiser steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError


class WarmupCosine:
    """LR multiplier: ``(step + 1) / warmup`` during warm-up, then cosine from 1 down to ``min_ratio``.

    A callable object rather than a closure so that ``LambdaLR.state_dict()`` stores its fields
    (plain numbers, loadable with ``weights_only=True``).

    Args:
        warmup: Warm-up steps (0 disables warm-up).
        total: Total optimiser steps of the run.
        min_ratio: Final LR as a fraction of the base LR.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0) -> None:
        self.warmup = int(warmup)
        self.total = int(total)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup: int, total: int, min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` applying :class:`WarmupCosine` to every parameter group.

    Args:
        optimizer: The optimiser whose LR is scheduled (its ``lr`` is the peak LR).
        warmup: Warm-up steps, ``0 <= warmup < total``.
        total: Total optimiser steps (> 0).
        min_ratio: Final LR as a fraction of the peak, in ``[0, 1]``.

    Returns:
        The scheduler; call ``.step()`` once after every optimiser step.

    Raises:
        ConfigError: on inconsistent step counts or ratio.
    """
    if total < 1 or not 0 <= warmup < total:
        raise ConfigError(f"need 0 <= warmup < steps, got warmup={warmup}, steps={total}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"min_ratio must be in [0, 1], got {min_ratio}")
    return LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
