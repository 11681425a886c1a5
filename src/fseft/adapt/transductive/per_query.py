"""Per-query transductive refinement (``fseft predict --transductive``): the strict transductive setting.

Each query starts from the original adapter, which ``steps`` Adam steps on the penalty alone refine
before that query is predicted; the original is restored afterwards. With the hinge the refinement
stops as soon as every proportion is inside its band (an in-band query leaves the parameters exactly
unchanged). The penalty is the whole objective here, so Adam makes it invariant to ``lam``; ``lr``
(default: the method's own training rate, e.g. 1e-2 for the linear probe, 1e-4 for the spatial
adapter) and ``steps`` set how far it may move. The gradient follows the soft proportion (mean
probability, the paper's), but the iterate kept is the one whose written mask (probability > 0.5)
lies closest to the band (ties: the latest), so a refinement never leaves the output further from
the prior than it started. Both guards come from OpenKBP runs: with a rate of 1e-2 for every method
the spatial adapter overshot to an empty mask (soft proportion 0.0077 -> 0.0000, prior 0.0042), and
an uncertain larynx adapter (probability ~0.25 over the whole body: soft proportion 0.27, prior
0.001) had its mask emptied long before the soft proportion reached the band.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ...errors import ConfigError
from ...models.feature_store import FeatureStore
from ..model import AdaptedModel
from .config import QueryReport, TransductiveConfig
from .features import (
    QueryFeatures,
    band_distance,
    check_black_box,
    penalty,
    prior_tensor,
    query_features,
    query_prior,
    soft_and_mask_proportions,
)
from .priors import SizePrior

logger = logging.getLogger(__name__)


def refine(
    adapted: AdaptedModel, query: QueryFeatures, priors: Sequence[SizePrior], cfg: TransductiveConfig
) -> QueryReport:
    """Refine ``adapted`` in place on one query with at most ``cfg.steps`` Adam steps on the penalty alone.

    With the hinge, refinement stops as soon as the penalty is exactly zero (every proportion inside
    its band); a query already inside the band leaves the parameters untouched. The gradient comes
    from the soft proportion (the paper's), but the iterate kept is the one whose *mask* proportion
    (what prediction writes) lies closest to the bands (:func:`band_distance`; ties: the latest), so
    a refinement never leaves the written mask further from the prior than it started.

    Args:
        adapted: The adapted model (black-box method); modified in place.
        query: The query's features.
        priors: One size prior per target structure.
        cfg: Options (``steps``, ``lr``, ``constraint``, ``prior``, ``lam``, ``margin``, ``t0``,
            ``t_growth``).

    Returns:
        The query's :class:`QueryReport` (``steps``: the Adam steps that led to the kept iterate).

    Raises:
        ConfigError: a method that is not black-box, or a structure without a prior.
    """
    check_black_box(adapted)
    prior = query_prior(adapted, priors, query, cfg.prior)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr if cfg.lr is not None else adapted.lr)
    was_training = adapted.training
    adapted.eval()  # deterministic forward; gradients still flow to the trainable parameters
    before: list[float] = []
    mask_before: list[float] = []
    best_distance, best_step = float("inf"), 0
    best_params: list[torch.Tensor] = []
    try:
        with torch.enable_grad():
            for step in range(cfg.steps + 1):
                p_hat, mask = soft_and_mask_proportions(adapted, query)
                distance = band_distance(mask, prior, cfg.margin)
                if distance <= best_distance:
                    best_distance, best_step = distance, step
                    best_params = [p.detach().clone() for p in params]
                if step == 0:
                    before, mask_before = p_hat.detach().cpu().tolist(), mask.cpu().tolist()
                loss = penalty(p_hat, prior, cfg, step)
                if step == cfg.steps or (cfg.constraint == "hinge" and float(loss.detach()) == 0.0):
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            for p, kept in zip(params, best_params, strict=True):
                p.copy_(kept)
            soft, mask = soft_and_mask_proportions(adapted, query)
    finally:
        adapted.zero_grad(set_to_none=True)
        adapted.train(was_training)
    return QueryReport(query.name, list(adapted.structures), prior.cpu().tolist(), before, soft.cpu().tolist(),
                       best_step, mask_before=mask_before, mask_after=mask.cpu().tolist())  # fmt: skip


class PerQueryRefiner:
    """Per-query transductive refinement: each query starts from the original adapter.

    Use as a context manager; :meth:`refine` restores the original trainable state, then refines it
    on one preprocessed query (the model is left refined for predicting that query); leaving the
    context restores the original state.

    Args:
        adapted: The adapted model (black-box method); refined in place, restored on exit.
        priors: One size prior per target structure.
        cfg: Options (``mode`` is not consulted).
        features: Reuse (and keep) each query's frozen backbone windows there, so prediction,
            given the same store, replays them instead of running the backbone a second time.

    Raises:
        ConfigError: a method that is not black-box, or a structure without a prior.
    """

    def __init__(
        self,
        adapted: AdaptedModel,
        priors: Sequence[SizePrior],
        cfg: TransductiveConfig,
        *,
        features: FeatureStore | None = None,
    ) -> None:
        check_black_box(adapted)
        prior_tensor(adapted, priors)
        self.adapted = adapted
        self.priors = tuple(priors)
        self.cfg = cfg
        self.features = features
        self.reports: list[QueryReport] = []
        self._snapshot: dict[str, torch.Tensor] = {}

    def __enter__(self) -> PerQueryRefiner:
        self._snapshot = {k: v.clone() for k, v in self.adapted.trainable_state_dict().items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            self.adapted.load_state_dict(self._snapshot, strict=False)

    def refine(self, name: str, image: torch.Tensor) -> QueryReport:
        """Reset to the original adapter and refine it on one ``[1, X, Y, Z]`` preprocessed query.

        Its signature is prediction's refinement hook with the query's name bound
        (:func:`fseft.inference.predict_files` ``refine=``), so a query is read and preprocessed once.

        Returns:
            The query's :class:`QueryReport` (also appended to :attr:`reports`).
        """
        if not self._snapshot:
            raise ConfigError("PerQueryRefiner.refine must be called inside its 'with' block")
        start = time.perf_counter()
        self._restore()
        (query,) = query_features(self.adapted, [image], [name], self.cfg, store=self.features)
        report = refine(self.adapted, query, self.priors, self.cfg)
        report.seconds = time.perf_counter() - start
        self.reports.append(report)
        logger.info(
            "%s: proportions %s -> %s (prior %s, %d steps)",
            name,
            _fmt(report.before),
            _fmt(report.after),
            _fmt(report.prior),
            report.steps,
        )
        return report


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


__all__ = ["PerQueryRefiner", "refine"]
