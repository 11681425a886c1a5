"""Batch-mode constrained transductive adaptation: the size constraint on all query volumes,
combined with the supervised Dice loss during few-shot training (``fseft adapt --transductive QUERIES``).

After ``warmup_epochs`` supervised epochs (at most half of the epochs the training runs; or earlier, at the epoch where the supervised loss
plateaus: early stopping then restarts for the constrained phase), once per epoch, the gradient of
``lam * mean_{query, structure} penalty`` is added to the next supervised Dice step, so that step
minimises ``Dice + lam * penalty`` with the trainer's own AdamW optimiser and schedule (the paper's
reference code also shares its optimiser between the two losses). The trainer calls the constraint
as its epoch hook; the gradient is injected by parameter gradient hooks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import ConfigError
from ..model import AdaptedModel
from ..trainer import EpochReport
from .config import QueryReport, TransductiveConfig, TransductiveResult
from .features import QueryFeatures, check_black_box, penalty, predicted_proportions, query_prior
from .priors import SizePrior


class BatchConstraint:
    """Batch-mode constraint steps during supervised training, through the trainer's progress callback.

    After every training epoch from ``cfg.warmup_epochs`` on (or from half of the training's epochs
    when that comes first), or from the first epoch where the
    supervised loss plateaus (the trainer's early stopping then restarts, so the constrained phase is
    not cut short by the supervised plateau), the gradient of
    ``lam * mean_{query, structure} penalty`` is computed (query by query, so memory holds one query
    at a time) and added, by parameter gradient hooks, to the gradient of the next supervised step:
    that step minimises ``Dice + lam * penalty`` with the trainer's optimiser and learning rate. The
    gradient pending when training stops is dropped.

    Use as a context manager around :func:`~fseft.adapt.trainer.fit` and pass it as its epoch ``hook``.

    Args:
        adapted: The adapted model being trained (black-box method).
        queries: Features of the query volumes.
        priors: One size prior per target structure.
        cfg: Options (``warmup_epochs``, ``constraint``, ``lam``, ``margin``, ``t0``, ``t_growth``).
    """

    def __init__(
        self,
        adapted: AdaptedModel,
        queries: Sequence[QueryFeatures],
        priors: Sequence[SizePrior],
        cfg: TransductiveConfig,
    ) -> None:
        check_black_box(adapted)
        if not queries:
            raise ConfigError("transductive batch mode needs at least one query volume")
        self.adapted = adapted
        self.queries = list(queries)
        self.priors = [query_prior(adapted, priors, q, cfg.prior) for q in self.queries]
        self.cfg = cfg
        self.params = [p for p in adapted.parameters() if p.requires_grad]
        self.pending: list[torch.Tensor | None] = [None] * len(self.params)
        self.started = False
        self.computed = 0
        self.applied = 0
        self.seconds = 0.0
        self.before: list[list[float]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> BatchConstraint:
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pending = [None] * len(self.params)

    def _hook(self, index: int) -> Any:
        def add_pending(grad: torch.Tensor) -> torch.Tensor:
            extra = self.pending[index]
            if extra is None:
                return grad
            self.pending[index] = None
            if index == 0:
                self.applied += 1
            return grad + extra

        return add_pending

    def after_epoch(self, report: EpochReport) -> bool:
        """The trainer's epoch hook: take the constraint step once the constrained phase has begun.

        Returns:
            True at the epoch where a supervised plateau starts the constrained phase, so the
            trainer's early stopping starts over.
        """
        restart = False
        if report.stage == "train":
            warmup = min(self.cfg.warmup_epochs, max(1, report.total // 2))  # short runs: the second half
            if not self.started and (report.epoch >= warmup or report.plateau):
                self.started, restart = True, report.plateau
            if self.started:
                self.step()
        return restart

    def proportions(self) -> list[list[float]]:
        """Current predicted proportions, per query and structure."""
        was_training = self.adapted.training
        self.adapted.eval()
        with torch.no_grad():
            out = [predicted_proportions(self.adapted, q).cpu().tolist() for q in self.queries]
        self.adapted.train(was_training)
        return out

    def step(self) -> None:
        """Compute the constraint gradient and leave it pending for the next supervised step."""
        start = time.perf_counter()
        was_training = self.adapted.training
        self.adapted.eval()
        total: list[torch.Tensor] = [torch.zeros_like(p) for p in self.params]
        current = []
        with torch.enable_grad():
            for q, prior in zip(self.queries, self.priors, strict=True):
                p_hat = predicted_proportions(self.adapted, q)
                current.append(p_hat.detach().cpu().tolist())
                loss = penalty(p_hat, prior, self.cfg, self.computed) / len(self.queries)
                if loss.requires_grad and float(loss.detach()) != 0.0:  # inside its band the hinge adds nothing
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                    total = [t + g if g is not None else t for t, g in zip(total, grads, strict=True)]
        self.adapted.train(was_training)
        if not self.before:
            self.before = current
        self.pending = list(total)
        self.computed += 1
        self.seconds += time.perf_counter() - start

    def reports(self) -> list[QueryReport]:
        """Per-query predicted vs prior proportions (before: at the first constraint step; after: now)."""
        after = self.proportions()
        before = self.before or after
        structures = list(self.adapted.structures)
        return [
            QueryReport(q.name, structures, prior.cpu().tolist(), b, a, self.applied)
            for q, prior, b, a in zip(self.queries, self.priors, before, after, strict=True)
        ]

    def record(self, result: TransductiveResult) -> None:
        """Store the per-query reports, applied steps and constraint time in ``result``."""
        result.reports, result.constraint_steps = self.reports(), self.applied
        result.constraint_time_s = self.seconds


__all__ = ["BatchConstraint"]
