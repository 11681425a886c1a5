"""Batch-mode constrained transductive adaptation: the size constraint on all query volumes,
combined with the supervised Dice loss during few-shot training (see :mod:`fseft.adapt.transductive`).

After ``warmup_epochs`` supervised epochs (or earlier, at the epoch where the supervised loss
plateaus: early stopping then restarts for the constrained phase), once per epoch, the gradient of
``lam * mean_{query, structure} penalty`` is added to the next supervised Dice step, so that step
minimises ``Dice + lam * penalty`` with the trainer's own AdamW optimiser and schedule (the paper's
reference code also shares its optimiser between the two losses). The trainer runs unchanged: the
constraint is computed in its per-epoch progress callback and injected by parameter gradient hooks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .size_prior import SizePrior
from .transductive import (
    QueryFeatures,
    QueryReport,
    TransductiveConfig,
    check_black_box,
    penalty,
    predicted_proportions,
    prior_tensor,
    query_features,
)

if TYPE_CHECKING:
    from ..config import PreprocessConfig
    from ..data.cases import Case
    from ..models import FoundationModel
    from .api import AdaptRecord
    from .model import AdaptedModel
    from .trainer import AdaptTrainConfig, EpochReport, Progress

logger = logging.getLogger(__name__)


class BatchConstraint:
    """Batch-mode constraint steps during supervised training, through the trainer's progress callback.

    After every training epoch from ``cfg.warmup_epochs`` on, or from the first epoch where the
    supervised loss plateaus (the trainer's early stopping then restarts, so the constrained phase is
    not cut short by the supervised plateau), the gradient of
    ``lam * mean_{query, structure} penalty`` is computed (query by query, so memory holds one query
    at a time) and added, by parameter gradient hooks, to the gradient of the next supervised step:
    that step minimises ``Dice + lam * penalty`` with the trainer's optimiser and learning rate. The
    gradient pending when training stops is dropped.

    Use as a context manager around :func:`~fseft.adapt.trainer.fit` and pass :meth:`wrap` ``(progress)``
    as its progress callback.

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
        self.prior = prior_tensor(adapted, priors)
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

    def wrap(self, progress: Progress | None) -> Progress:
        """A progress callback that takes the constraint step, then calls ``progress``."""

        def callback(report: EpochReport) -> bool:
            restart = False
            if report.stage == "train":
                if not self.started and (report.epoch >= self.cfg.warmup_epochs or report.plateau):
                    self.started, restart = True, report.plateau
                if self.started:
                    self.step()
            if progress is not None:
                progress(report)
            return restart

        return callback

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
            for q in self.queries:
                p_hat = predicted_proportions(self.adapted, q)
                current.append(p_hat.detach().cpu().tolist())
                loss = penalty(p_hat, self.prior, self.cfg, self.computed) / len(self.queries)
                if loss.requires_grad:
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
        prior = self.prior.cpu().tolist()
        structures = list(self.adapted.structures)
        return [
            QueryReport(q.name, structures, prior, b, a, self.applied)
            for q, b, a in zip(self.queries, before, after, strict=True)
        ]


@dataclass
class TransductiveResult:
    """What transductive adaptation learnt and did.

    Args:
        config: The options used.
        priors: One size prior per target structure (from the support volumes).
        reports: Per-query predicted vs prior proportions (batch mode; empty in per-query mode).
        constraint_steps: Constraint gradients applied to supervised steps (batch mode).
        feature_time_s: Seconds spent computing the query features.
        constraint_time_s: Seconds spent computing constraint gradients (batch mode).
    """

    config: TransductiveConfig
    priors: tuple[SizePrior, ...]
    reports: list[QueryReport] = field(default_factory=list)
    constraint_steps: int = 0
    feature_time_s: float = 0.0
    constraint_time_s: float = 0.0

    def to_record(self) -> dict[str, Any]:
        """``{"size_priors": [...], "transductive": {...}}``, to merge into the adapter file's record."""
        from ..config import to_dict
        from .size_prior import priors_to_record

        return {
            **priors_to_record(self.priors),
            "transductive": {
                "config": to_dict(self.config),
                "constraint_steps": self.constraint_steps,
                "feature_time_s": self.feature_time_s,
                "constraint_time_s": self.constraint_time_s,
                "queries": [r.to_dict() for r in self.reports],
            },
        }


def load_query_images(
    cases: Sequence[Case], structures: Sequence[str], preprocess: PreprocessConfig
) -> list[torch.Tensor]:
    """Preprocessed ``[1, X, Y, Z]`` images of unlabelled query cases (labels are never read).

    Raises:
        DataError: when a case's image cannot be read.
    """
    from ..data.dataset import PreprocessedCache

    cache = PreprocessedCache(structures, preprocess, with_label=False)
    out = []
    for case in cases:
        image = cache.get(case)["image"]
        out.append((image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float())
    return out


def adapt_transductive(
    model: FoundationModel | str | os.PathLike[str],
    support: str | os.PathLike[str] | Sequence[Case],
    structures: str | Sequence[str],
    queries: str | os.PathLike[str] | Sequence[Case] | None,
    *,
    transductive: TransductiveConfig | None = None,
    k: int = 5,
    seed: int = 0,
    method: str = "spatial-adapter",
    task: str = "binary",
    method_config: Any | None = None,
    train_config: AdaptTrainConfig | None = None,
    validation: str | bool | None = None,
    progress: Progress | None = None,
) -> tuple[AdaptedModel, AdaptRecord, TransductiveResult]:
    """:func:`fseft.adapt.api.adapt` plus size priors and, in batch mode, the query constraint.

    Args:
        model: A foundation model, a registered model name or a model file.
        support: Manifest path or cases the k-shot support is drawn from.
        structures: Target structure(s).
        queries: Unlabelled query cases (manifest path or cases); required in batch mode, unused
            (may be None) in per-query mode, where only the priors are learnt for prediction time.
        transductive: Options (defaults: batch mode, hinge, lambda 0.1, margin 0.3).
        k: Support volumes.
        seed: Seed of sampling, initialisation and crops.
        method: A black-box adaptation method.
        task: ``"binary"`` or ``"multiclass"``.
        method_config: The method's config (dataclass or dict), None for defaults.
        train_config: Supervised training options.
        validation: Held-out validation case id, True, or None.
        progress: Per-epoch callback.

    Returns:
        ``(adapted model in eval mode, record of the run, transductive result)``.

    Raises:
        ConfigError: as :func:`~fseft.adapt.api.adapt`, a method that is not black-box, or batch
            mode without queries.
        DataError: unreadable cases, or a structure absent from every support volume.
    """
    from .api import adapt
    from .size_prior import size_priors

    tx = transductive or TransductiveConfig()
    if tx.mode == "batch" and queries is None:
        raise ConfigError("transductive batch mode needs query volumes (a manifest of unlabelled cases)")
    holder: dict[str, TransductiveResult] = {}

    @contextlib.contextmanager
    def around_fit(adapted: AdaptedModel, volumes: Sequence[Any], on_epoch: Progress | None) -> Iterator[Any]:
        check_black_box(adapted)
        pre = adapted.base.config.preprocess
        result = holder["result"] = TransductiveResult(
            tx, size_priors(volumes, adapted.structures, pre.spacing)
        )
        if tx.mode != "batch":
            yield on_epoch
            return
        from .api import _resolve_cases

        query_cases = _resolve_cases(queries)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        images = load_query_images(query_cases, adapted.structures, pre)
        feats = query_features(adapted, images, [c.case_id for c in query_cases], tx)
        result.feature_time_s = time.perf_counter() - t0
        with BatchConstraint(adapted, feats, result.priors, tx) as constraint:
            yield constraint.wrap(on_epoch)
        result.reports, result.constraint_steps = constraint.reports(), constraint.applied
        result.constraint_time_s = constraint.seconds

    adapted, record = adapt(
        model, support, structures, k=k, seed=seed, method=method, task=task, method_config=method_config,
        train_config=train_config, validation=validation, progress=progress, around_fit=around_fit,
    )  # fmt: skip
    result = holder["result"]
    record.feature_time_s += result.feature_time_s
    if tx.mode == "batch" and result.constraint_steps == 0:
        logger.warning(
            "training stopped after %d epoch(s), before any constraint step (warm-up %d epochs, "
            "or the first plateau)", record.epochs_run, tx.warmup_epochs,
        )  # fmt: skip
    return adapted, record, result


__all__ = ["BatchConstraint", "TransductiveResult", "adapt_transductive", "load_query_images"]
