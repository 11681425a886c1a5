"""What both transductive modes compute on a query: frozen features, predicted proportions, the penalty.

For each query volume the frozen backbone runs once (the whole-volume sliding-window features of
:class:`~fseft.adapt.feature_cache.FeatureCache`, optionally average-pooled by ``pool`` per axis to
bound memory, as the reference code does with 2). The predicted proportion of a structure is the
mean sigmoid (multi-class: softmax) probability over the query's body (``image > 0``). Only the
black-box parts train (adapter and head): methods that train anything upstream of the decoder
output are refused, because their query features would have to be recomputed at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...config import PreprocessConfig
from ...data.cases import Case
from ...data.dataset import PreprocessedCache
from ...errors import ConfigError
from ...models.feature_store import FeatureStore
from ..feature_cache import FeatureCache
from ..model import AdaptedModel
from .config import TransductiveConfig
from .constraints import band_violations, get_constraint
from .priors import SizePrior


@dataclass
class QueryFeatures:
    """Frozen features of one query, ready for the adapter and head.

    Args:
        name: Query name.
        features: ``[1, F, x, y, z]`` float32 (pooled) feature map.
        weights: ``[1, 1, x, y, z]`` fraction of body voxels of each (pooled) feature voxel.
        body_ml: Volume of the query's body (``image > 0`` on the model grid) in ml.
    """

    name: str
    features: torch.Tensor
    weights: torch.Tensor
    body_ml: float


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
    adapted: AdaptedModel,
    images: Sequence[torch.Tensor],
    names: Sequence[str],
    cfg: TransductiveConfig,
    *,
    store: FeatureStore | None = None,
) -> list[QueryFeatures]:
    """Whole-volume frozen features of preprocessed query images, pooled by ``cfg.pool``.

    Args:
        adapted: The adapted model (black-box method).
        images: ``[1, X, Y, Z]`` preprocessed query volumes.
        names: One name per image.
        cfg: Options (``pool``, ``feature_overlap``, ``sw_batch_size``).
        store: Reuse (and keep) the frozen backbone's windows of each query there.

    Returns:
        One :class:`QueryFeatures` per image, on the model's device.

    Raises:
        ConfigError: for a method that is not black-box.
    """
    check_black_box(adapted)
    device = next(adapted.parameters()).device
    roi = tuple(int(r) for r in adapted.base.config.preprocess.roi)
    voxel_ml = float(np.prod(adapted.base.config.preprocess.spacing)) / 1000.0
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
                store=store,
                fingerprint=adapted.base_fingerprint,
            ) as cache:
                features = cache.volume(0)[None].to(device)
            weights = (image > 0).float()[None].to(device)
            body_ml = float(weights.sum()) * voxel_ml
            if cfg.pool > 1:
                features = F.avg_pool3d(features, cfg.pool, ceil_mode=True)
                weights = F.avg_pool3d(weights, cfg.pool, ceil_mode=True)
            out.append(QueryFeatures(name, features, weights, body_ml))
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


def query_prior(
    adapted: AdaptedModel, priors: Sequence[SizePrior], query: QueryFeatures, kind: str
) -> torch.Tensor:
    """The prior proportions ``[S]`` one query is held to.

    ``"proportion"``: the support's mean proportion of the body (the same for every query);
    ``"volume"``: the support's mean volume in ml divided by this query's body volume (at most 1), so
    a query showing more of the patient (a longer scan) gets a smaller proportion, as it should.

    Raises:
        ConfigError: an unknown kind, or structures without a prior.
    """
    proportion = prior_tensor(adapted, priors)
    if kind == "proportion":
        return proportion
    if kind != "volume":
        raise ConfigError(f"unknown size prior {kind!r}; choose proportion or volume")
    by_name = {p.structure: p.volume_ml for p in priors}
    ml = torch.tensor([by_name[s] for s in adapted.structures], dtype=torch.float32, device=proportion.device)
    return (ml / max(query.body_ml, 1e-6)).clamp(max=1.0)


def penalty(p_hat: torch.Tensor, prior: torch.Tensor, cfg: TransductiveConfig, step: int) -> torch.Tensor:
    """``lam * mean`` of the configured penalty over structures, at constraint step ``step``."""
    return cfg.lam * get_constraint(cfg.constraint)(p_hat, prior, cfg.margin, cfg.temperature(step)).mean()


def band_distance(p_hat: torch.Tensor, prior: torch.Tensor, margin: float) -> float:
    """Summed relative distance of the proportions outside their bands (0 when all are inside)."""
    over, under = band_violations(p_hat, prior, margin)
    return float((torch.relu(over) + torch.relu(under)).sum())


def load_query_images(
    cases: Sequence[Case], structures: Sequence[str], preprocess: PreprocessConfig
) -> list[torch.Tensor]:
    """Preprocessed ``[1, X, Y, Z]`` images of unlabelled query cases (labels are never read).

    Raises:
        DataError: when a case's image cannot be read.
    """
    cache = PreprocessedCache(structures, preprocess, with_label=False)
    out = []
    for case in cases:
        image = cache.get(case)["image"]
        out.append((image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float())
    return out


__all__ = [
    "QueryFeatures",
    "band_distance",
    "check_black_box",
    "load_query_images",
    "penalty",
    "predicted_proportions",
    "prior_tensor",
    "query_prior",
    "query_features",
    "soft_and_mask_proportions",
]
