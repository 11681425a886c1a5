"""Constrained transductive inference: correct a black-box adapter on unlabelled query volumes with a
size prior learnt from the support set (Silva-Rodríguez, Dolz & Ben Ayed, MedIA 2025).

For each query volume the frozen backbone runs once (the whole-volume sliding-window features of
:class:`~fseft.adapt.feature_cache.FeatureCache`, optionally average-pooled by ``pool`` per axis to
bound memory, as the reference code does with 2). The predicted proportion of a structure is the
mean sigmoid (multi-class: softmax) probability over the query's body (``image > 0``); a penalty of
:mod:`fseft.adapt.constraints` keeps it within a relative margin of the prior
(:mod:`fseft.adapt.size_prior`). Only the black-box parts train (adapter and head): methods that
train anything upstream of the decoder output (LoRA, adapters inside the encoder, fine-tuned
decoders) are refused, because their query features would have to be recomputed through the
backbone at every step.

Two modes:

* ``"batch"`` (:mod:`fseft.adapt.transductive_batch`, ``fseft adapt --transductive QUERIES``): all
  query volumes together, during adaptation: after ``warmup_epochs`` supervised epochs, one
  constraint step per epoch, combined with the supervised Dice loss.
* ``"per-query"`` (:class:`PerQueryRefiner`, ``fseft predict --transductive``): the strict
  transductive setting. Each query starts from the original adapter, which ``steps`` Adam steps on
  the penalty alone refine before that query is predicted; the original is restored afterwards. With
  the hinge the refinement stops as soon as every proportion is inside its band (an in-band query
  leaves the parameters exactly unchanged). The penalty is the whole objective here, so Adam makes
  it invariant to ``lam``; ``lr`` (default: the method's own training rate, e.g. 1e-2 for the linear
  probe, 1e-4 for the spatial adapter) and ``steps`` set how far it may move. The gradient follows
  the soft proportion (mean probability, the paper's), but the iterate kept is the one whose written
  mask (probability > 0.5) lies closest to the band (ties: the latest), so a refinement never leaves
  the output further from the prior than it started. Both guards come from OpenKBP runs: with a rate
  of 1e-2 for every method the spatial adapter overshot to an empty mask (soft proportion 0.0077 ->
  0.0000, prior 0.0042), and an uncertain larynx adapter (probability ~0.25 over the whole body:
  soft proportion 0.27, prior 0.001) had its mask emptied long before the soft proportion reached
  the band.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .constraints import band_violations, get_constraint
from .feature_cache import FeatureCache
from .size_prior import SizePrior

if TYPE_CHECKING:
    from ..data.image import Image
    from .model import AdaptedModel

logger = logging.getLogger(__name__)

MODES = ("batch", "per-query")


@dataclass(frozen=True)
class TransductiveConfig:
    """Options of constrained transductive inference (defaults: the paper's reference code).

    Args:
        mode: ``"batch"`` (all queries together, during adaptation) or ``"per-query"`` (a fresh
            refinement of the adapter for each query, before predicting it).
        constraint: ``"hinge"`` or ``"log-barrier"`` (:mod:`fseft.adapt.constraints`).
        lam: Weight of the penalty (relative to the supervised Dice loss in batch mode).
        margin: Relative half-width ``m`` of the band ``[(1 - m), (1 + m)] * prior``.
        warmup_epochs: Batch mode: supervised epochs before the first constraint step.
        steps: Per-query mode: at most this many refinement steps per query.
        lr: Per-query mode: Adam learning rate of the refinement (None: the adapted method's rate).
        t0: Log-barrier temperature at the first constraint step.
        t_growth: Factor applied to ``t`` after every constraint step.
        pool: Average-pooling factor per axis of the query features (1: full resolution).
        feature_overlap: Sliding-window overlap when computing query features.
        sw_batch_size: Windows per forward pass when computing query features.

    Raises:
        ConfigError: on an unknown mode or constraint, or out-of-range values.
    """

    mode: str = "batch"
    constraint: str = "hinge"
    lam: float = 0.1
    margin: float = 0.3
    warmup_epochs: int = 50
    steps: int = 50
    lr: float | None = None
    t0: float = 5.0
    t_growth: float = 1.1
    pool: int = 2
    feature_overlap: float = 0.5
    sw_batch_size: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown transductive mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        get_constraint(self.constraint)
        if not self.lam > 0 or not 0 <= self.margin < 1 or (self.lr is not None and not self.lr > 0):
            raise ConfigError(
                f"lambda and lr must be > 0 and margin in [0, 1), got {self.lam}, {self.lr}, {self.margin}"
            )
        if self.constraint == "log-barrier" and self.margin == 0:
            raise ConfigError("the log-barrier needs a band with an interior: margin must be > 0")
        if self.warmup_epochs < 0 or self.steps < 1 or self.pool < 1 or self.sw_batch_size < 1:
            raise ConfigError("warmup_epochs must be >= 0, steps, pool and sw_batch_size >= 1")
        if not self.t0 > 0 or not self.t_growth >= 1 or not 0 <= self.feature_overlap < 1:
            raise ConfigError("t0 must be > 0, t_growth >= 1 and feature_overlap in [0, 1)")

    def temperature(self, step: int) -> float:
        """Log-barrier ``t`` at constraint step ``step`` (0-based): ``t0 * t_growth ** step``."""
        return self.t0 * self.t_growth**step


@dataclass
class QueryReport:
    """Predicted vs prior proportions of one query (or of the batch mode's queries, per query).

    Args:
        query: Query name (case id or file name).
        structures: Target structures.
        prior: Prior proportion per structure.
        before: Predicted proportion per structure before refinement (batch: at the first
            constraint step).
        after: Predicted proportion per structure after refinement.
        steps: Constraint steps taken (per-query: the steps that led to the iterate kept).
        seconds: Wall time of features + refinement for this query (per-query mode).
        mask_before: Proportion of the thresholded mask per structure before refinement (per-query).
        mask_after: The same after refinement (per-query).
    """

    query: str
    structures: list[str]
    prior: list[float]
    before: list[float]
    after: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    mask_before: list[float] = field(default_factory=list)
    mask_after: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


@dataclass
class QueryFeatures:
    """Frozen features of one query, ready for the adapter and head.

    Args:
        name: Query name.
        features: ``[1, F, x, y, z]`` float32 (pooled) feature map.
        weights: ``[1, 1, x, y, z]`` fraction of body voxels of each (pooled) feature voxel.
    """

    name: str
    features: torch.Tensor
    weights: torch.Tensor


def check_black_box(adapted: AdaptedModel) -> None:
    """Refuse methods whose query features cannot be cached, or that train nothing.

    Raises:
        ConfigError: naming the method and why.
    """
    base_trains = any(p.requires_grad for p in adapted.base.parameters())
    if not adapted.black_box or base_trains:
        raise ConfigError(
            f"transductive inference needs a black-box method (frozen backbone, e.g. linear-probe, "
            f"spatial-adapter); {adapted.method_name!r} with this configuration trains the backbone, so "
            "the query features cannot be computed once"
        )
    if not any(p.requires_grad for p in adapted.parameters()):
        raise ConfigError(
            f"transductive inference needs trainable parameters; {adapted.method_name!r} trains nothing"
        )


@torch.no_grad()
def query_features(
    adapted: AdaptedModel, images: Sequence[torch.Tensor], names: Sequence[str], cfg: TransductiveConfig
) -> list[QueryFeatures]:
    """Whole-volume frozen features of preprocessed query images, pooled by ``cfg.pool``.

    Args:
        adapted: The adapted model (black-box method).
        images: ``[1, X, Y, Z]`` preprocessed query volumes.
        names: One name per image.
        cfg: Options (``pool``, ``feature_overlap``, ``sw_batch_size``).

    Returns:
        One :class:`QueryFeatures` per image, on the model's device.

    Raises:
        ConfigError: for a method that is not black-box.
    """
    check_black_box(adapted)
    device = next(adapted.parameters()).device
    roi = tuple(int(r) for r in adapted.base.config.preprocess.roi)
    was_training = adapted.training
    adapted.eval()
    out = []
    try:
        for name, image in zip(names, images, strict=True):
            with FeatureCache.build(
                adapted.features,
                [image],
                roi,
                overlap=cfg.feature_overlap,
                sw_batch_size=cfg.sw_batch_size,
                device=device,
            ) as cache:
                features = cache.volume(0)[None].to(device)
            weights = (image > 0).float()[None].to(device)
            if cfg.pool > 1:
                features = F.avg_pool3d(features, cfg.pool, ceil_mode=True)
                weights = F.avg_pool3d(weights, cfg.pool, ceil_mode=True)
            out.append(QueryFeatures(name, features, weights))
    finally:
        adapted.train(was_training)
    return out


def predicted_proportions(adapted: AdaptedModel, query: QueryFeatures) -> torch.Tensor:
    """Mean probability of each target structure over the query's body, ``[S]`` (differentiable).

    ``binary``: sigmoid per channel; ``multiclass``: softmax channels ``1..C-1``.
    """
    return soft_and_mask_proportions(adapted, query)[0]


def soft_and_mask_proportions(adapted: AdaptedModel, query: QueryFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """``(soft, mask)`` proportions ``[S]`` of each structure over the query's body, from one forward.

    ``soft`` is :func:`predicted_proportions` (differentiable); ``mask`` is the proportion of the
    mask the prediction will write (sigmoid > 0.5; multiclass: the argmax), not differentiable. The
    two can differ by far: an uncertain adapter spreading probability 0.2-0.3 over the whole body
    has a large soft proportion and an empty mask.
    """
    logits = adapted.forward_features(query.features)
    if adapted.task == "multiclass":
        probs = logits.softmax(1)
        mask = F.one_hot(probs.argmax(1), probs.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        probs = probs[:, 1:]
    else:
        probs = logits.sigmoid()
        mask = (probs > 0.5).to(probs.dtype)
    w = query.weights
    total = w.sum().clamp_min(1e-8)
    return (probs * w).sum(dim=(0, 2, 3, 4)) / total, (mask * w).sum(dim=(0, 2, 3, 4)).detach() / total


def prior_tensor(adapted: AdaptedModel, priors: Sequence[SizePrior]) -> torch.Tensor:
    """Prior proportions ``[S]`` in the adapted model's structure order, on its device.

    Raises:
        ConfigError: naming the structures without a prior.
    """
    by_name = {p.structure: p.proportion for p in priors}
    missing = [s for s in adapted.structures if s not in by_name]
    if missing:
        raise ConfigError(f"no size prior for {', '.join(missing)}")
    device = next(adapted.parameters()).device
    return torch.tensor([by_name[s] for s in adapted.structures], dtype=torch.float32, device=device)


def penalty(p_hat: torch.Tensor, prior: torch.Tensor, cfg: TransductiveConfig, step: int) -> torch.Tensor:
    """``lam * mean`` of the configured penalty over structures, at constraint step ``step``."""
    return cfg.lam * get_constraint(cfg.constraint)(p_hat, prior, cfg.margin, cfg.temperature(step)).mean()


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
        cfg: Options (``steps``, ``lr``, ``constraint``, ``lam``, ``margin``, ``t0``, ``t_growth``).

    Returns:
        The query's :class:`QueryReport` (``steps``: the Adam steps that led to the kept iterate).

    Raises:
        ConfigError: a method that is not black-box, or a structure without a prior.
    """
    check_black_box(adapted)
    prior = prior_tensor(adapted, priors)
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


def band_distance(p_hat: torch.Tensor, prior: torch.Tensor, margin: float) -> float:
    """Summed relative distance of the proportions outside their bands (0 when all are inside)."""
    over, under = band_violations(p_hat, prior, margin)
    return float((torch.relu(over) + torch.relu(under)).sum())


class PerQueryRefiner:
    """Per-query transductive refinement: each query starts from the original adapter.

    Use as a context manager; :meth:`refine` restores the original trainable state, then refines it
    on one preprocessed query (the model is left refined for predicting that query); leaving the
    context restores the original state.

    Args:
        adapted: The adapted model (black-box method); refined in place, restored on exit.
        priors: One size prior per target structure.
        cfg: Options (``mode`` is not consulted).

    Raises:
        ConfigError: a method that is not black-box, or a structure without a prior.
    """

    def __init__(self, adapted: AdaptedModel, priors: Sequence[SizePrior], cfg: TransductiveConfig) -> None:
        check_black_box(adapted)
        prior_tensor(adapted, priors)
        self.adapted = adapted
        self.priors = tuple(priors)
        self.cfg = cfg
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

        Returns:
            The query's :class:`QueryReport` (also appended to :attr:`reports`).
        """
        if not self._snapshot:
            raise ConfigError("PerQueryRefiner.refine must be called inside its 'with' block")
        start = time.perf_counter()
        self._restore()
        (query,) = query_features(self.adapted, [image], [name], self.cfg)
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

    def refine_image(self, name: str, image: Image) -> QueryReport:
        """:meth:`refine` on a CT image as read from disk (preprocessed as the model expects)."""
        from ..inference.predictor import describe_model, preprocess_image

        _, _, pre, base = describe_model(self.adapted)
        x, _ = preprocess_image(image, pre, base.structures)
        return self.refine(name, x[0])


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


__all__ = [
    "MODES",
    "PerQueryRefiner",
    "QueryFeatures",
    "QueryReport",
    "TransductiveConfig",
    "band_distance",
    "check_black_box",
    "penalty",
    "predicted_proportions",
    "prior_tensor",
    "query_features",
    "refine",
    "soft_and_mask_proportions",
]
