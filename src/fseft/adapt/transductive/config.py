"""Options and outcomes of constrained transductive inference: :class:`TransductiveConfig`,
:class:`QueryReport` (one query's proportions) and :class:`TransductiveResult` (what one run learnt)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...config import to_dict
from ...errors import ConfigError
from .constraints import get_constraint
from .priors import SizePrior, priors_to_record

MODES = ("batch", "per-query")
#: What a size prior constrains: the paper's proportion of the body, or an absolute volume in ml
#: converted per query to a proportion of that query's body.
PRIORS = ("proportion", "volume")


@dataclass(frozen=True)
class TransductiveConfig:
    """Options of constrained transductive inference (fseft's defaults).

    Not the reference code's: its transductive module (jusiro/fewshot-finetuning, first commit,
    ``fseft/transductive/TI_modules.py``) penalises a linear, asymmetric relative size error in batch
    mode; the ``hinge`` here is squared and symmetric (:mod:`.constraints` says why), the
    ``log-barrier`` and the per-query mode are fseft's own.

    Args:
        mode: ``"batch"`` (all queries together, during adaptation) or ``"per-query"`` (a fresh
            refinement of the adapter for each query, before predicting it).
        constraint: ``"hinge"`` or ``"log-barrier"`` (:mod:`.constraints`).
        prior: ``"proportion"`` (the paper's: the mean fraction of the body the structure occupies in
            the support volumes, the same for every query) or ``"volume"`` (its mean volume in ml,
            divided per query by that query's body volume: steady when fields of view differ).
        lam: Weight of the penalty (relative to the supervised Dice loss in batch mode).
        margin: Relative half-width ``m`` of the band ``[(1 - m), (1 + m)] * prior``.
        warmup_epochs: Batch mode: supervised epochs before the first constraint step (at most half
            of the epochs the training runs, so a short budget still gets its constrained half).
        steps: Per-query mode: at most this many refinement steps per query.
        lr: Per-query mode: Adam learning rate of the refinement (None: the adapted method's rate,
            ``MethodConfig.lr`` or its paper default).
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
    prior: str = "proportion"
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
        if self.prior not in PRIORS:
            raise ConfigError(f"unknown size prior {self.prior!r}; choose one of: {', '.join(PRIORS)}")
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
class TransductiveResult:
    """What transductive adaptation learnt and did.

    Args:
        config: The options used.
        priors: One size prior per target structure (from the support volumes).
        reports: Per-query predicted vs prior proportions (batch mode during adaptation; per-query
            mode once the queries are predicted).
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

    def run_record(self) -> dict[str, Any]:
        """What the run did (steps, timings, per-query reports), without the priors and options."""
        return {
            "constraint_steps": self.constraint_steps,
            "feature_time_s": self.feature_time_s,
            "constraint_time_s": self.constraint_time_s,
            "queries": [r.to_dict() for r in self.reports],
        }

    def to_record(self) -> dict[str, Any]:
        """``{"size_priors": [...], "transductive": {"config": {...}, ...run}}`` for a run record."""
        return {**priors_to_record(self.priors), "transductive": {"config": to_dict(self.config), **self.run_record()}}


__all__ = ["MODES", "PRIORS", "QueryReport", "TransductiveConfig", "TransductiveResult"]
