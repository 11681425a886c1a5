"""``fseft.adapt.api.adapt``: sample a k-shot support set, apply a method, train it (optionally with a
transductive size constraint), record the run; :class:`AdaptResult` saves itself."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..anatomy import canonical
from ..config import from_dict, to_dict
from ..data.cases import Case
from ..data.manifests import load_manifest
from ..errors import ConfigError
from ..io_utils import write_json_atomic
from ..models import FoundationModel, load_model
from ..models.feature_store import FeatureStore
from ..runtime import resolve_device
from .adapter_io import save_adapter
from .methods import get_method
from .model import AdaptedModel, apply_method, check_task
from .support import SupportVolume, foreground_checker, load_support_volumes, sample_support
from .trainer import AdaptTrainConfig, Progress, fit, resolve_path
from .transductive import (
    BatchConstraint,
    PerQueryRefiner,
    TransductiveConfig,
    TransductiveResult,
    check_black_box,
    load_query_images,
    query_features,
    size_priors,
)

logger = logging.getLogger(__name__)


@dataclass
class AdaptRecord:
    """Everything needed to report (and reproduce) one adaptation run.

    Args:
        method: Method name.
        method_config: The method's config as a dict.
        train_config: The :class:`AdaptTrainConfig` as a dict.
        seed: Seed of support sampling, initialisation and crops.
        k: Number of support volumes.
        structures: Target structures (canonical names, channel order).
        task: ``"binary"`` or ``"multiclass"``.
        support_case_ids: The support cases, in sampling order.
        validation_case_id: The held-out validation case, if any.
        base_fingerprint: :meth:`FoundationModel.fingerprint` of the base model (before adaptation).
        trainable_params: Parameters that trained.
        lr: Peak learning rate used (None when nothing trains).
        path: ``"naive"`` (backbone on every crop) or ``"cached"`` (frozen features computed once).
        wall_time_s: Whole adaptation (loading, caching, training).
        feature_time_s: Of which caching features.
        train_time_s: Of which training epochs.
        peak_memory_bytes: CUDA max allocated (``memory_kind="cuda-max-allocated"``) or the process's
            peak resident set (``"cpu-peak-rss"``) during the run.
        memory_kind: What ``peak_memory_bytes`` measures.
        loss_curve: Mean training loss per epoch.
        val_loss_curve: Validation loss per epoch (empty without a validation case).
        epochs_run: Epochs trained.
        stop_reason: Why training stopped (see :class:`~fseft.adapt.trainer.FitResult`).
        device: Where it ran.
        support_draw: How the support was drawn (:data:`~fseft.adapt.support.SUPPORT_DRAWS`).
        head_lr: The head's peak learning rate where it differs from ``lr`` (a head row that starts
            new, or the config's ``head_lr``), else None.
    """

    method: str
    method_config: dict[str, Any]
    train_config: dict[str, Any]
    seed: int
    k: int
    structures: list[str]
    task: str
    support_case_ids: list[str]
    validation_case_id: str | None
    base_fingerprint: str
    trainable_params: int
    lr: float | None
    path: str
    wall_time_s: float
    feature_time_s: float
    train_time_s: float
    peak_memory_bytes: int
    memory_kind: str
    loss_curve: list[float] = field(default_factory=list)
    val_loss_curve: list[float] = field(default_factory=list)
    epochs_run: int = 0
    stop_reason: str = ""
    device: str = "cpu"
    support_draw: str = "permutation"
    head_lr: float | None = None

    @property
    def final_loss(self) -> float | None:
        """Last epoch's mean training loss (None when nothing trained)."""
        return self.loss_curve[-1] if self.loss_curve else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptRecord:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: on unknown keys.
        """
        return from_dict(cls, data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the record as JSON, atomically; returns the path."""
        write_json_atomic(path, self.to_dict())
        return Path(path)


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on a GPU, else the process's peak RSS.

    On Linux the RSS high-water mark is reset at entry (``/proc/self/clear_refs``) so the peak is
    that of the block; where that is not possible it is the process's lifetime peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.kind = "cuda-max-allocated" if device.type == "cuda" else "cpu-peak-rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif platform.system() == "Linux":
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                logger.debug("cannot reset the RSS high-water mark; reporting the process peak")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self.peak = _rss_high_water()


def _rss_high_water() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


@dataclass
class AdaptResult:
    """What :func:`adapt` returns: the adapted model, the record of the run and, when asked for,
    what transductive adaptation learnt (size priors, batch-mode constraint steps).

    Args:
        model: The adapted model, in eval mode.
        record: The record of the run.
        transductive: The transductive result (None for plain adaptation).
    """

    model: AdaptedModel
    record: AdaptRecord
    transductive: TransductiveResult | None = None

    def record_dict(self) -> dict[str, Any]:
        """The run record as JSON, with the transductive priors, options and reports when present."""
        return {**self.record.to_dict(), **(self.transductive.to_record() if self.transductive else {})}

    def refiner(self, features: FeatureStore | None = None) -> PerQueryRefiner | None:
        """A per-query refiner over :attr:`model` in per-query mode (None otherwise); ``features``:
        where the queries' frozen backbone windows are reused (those prediction then replays)."""
        tx = self.transductive
        if tx is None or tx.config.mode != "per-query":
            return None
        return PerQueryRefiner(self.model, tx.priors, tx.config, features=features)

    def save(self, path: str | os.PathLike[str], record_path: str | os.PathLike[str] | None = None) -> Path:
        """Write the adapter file (priors and transductive options as header fields) and, when
        ``record_path`` is given, the run record beside it; a failed record write removes the adapter.

        Returns:
            The adapter file.
        """
        tx = self.transductive
        record = {**self.record.to_dict(), **({"transductive": tx.run_record()} if tx else {})}
        out = save_adapter(self.model, path, record, size_priors=tx.priors if tx else (),
                           transductive=tx.config if tx else None)  # fmt: skip
        if record_path is not None:
            try:
                write_json_atomic(record_path, self.record_dict())
            except BaseException:
                out.unlink(missing_ok=True)
                raise
        return out


def _resolve_model(model: FoundationModel | str | os.PathLike[str], structures: tuple[str, ...]) -> FoundationModel:
    """The model; a zoo checkpoint without a head gets ``structures`` as its (untrained) head."""
    return model if isinstance(model, FoundationModel) else load_model(model, structures=structures)


def _resolve_cases(cases: str | os.PathLike[str] | Sequence[Case]) -> list[Case]:
    if isinstance(cases, (str, os.PathLike)):
        return load_manifest(cases)
    return list(cases)


def adapt(
    model: FoundationModel | str | os.PathLike[str],
    support: str | os.PathLike[str] | Sequence[Case],
    structures: str | Sequence[str],
    *,
    k: int = 5,
    seed: int = 0,
    method: str = "spatial-adapter",
    task: str = "binary",
    method_config: Any | None = None,
    train_config: AdaptTrainConfig | None = None,
    validation: str | bool | None = None,
    transductive: TransductiveConfig | None = None,
    queries: str | os.PathLike[str] | Sequence[Case] | None = None,
    progress: Progress | None = None,
    support_draw: str = "permutation",
    features: FeatureStore | None = None,
) -> AdaptResult:
    """Adapt a foundation model to new structures from a k-shot support set.

    Silva-Rodríguez, Dolz & Ben Ayed, "Towards Foundation Models and Few-Shot Parameter-Efficient
    Fine-Tuning for Volumetric Organ Segmentation", MedIA 2025.

    With ``transductive`` the size priors of the targets are learnt from the support volumes; in
    batch mode the size constraint on the unlabelled ``queries`` joins training
    (:mod:`fseft.adapt.transductive.batch`); in per-query mode the priors are kept for prediction
    time (:meth:`AdaptResult.refiner`, or the adapter file).

    Args:
        model: A :class:`~fseft.models.FoundationModel`, a registered model name or a model file.
        support: A manifest path or a list of cases; the support is drawn from the cases annotating
            every target structure (:func:`~fseft.adapt.support.sample_support`).
        structures: Target structure name(s) (synonyms allowed).
        k: Number of support volumes.
        seed: Seed of support sampling, adapter initialisation and crops.
        method: Adaptation method name (:func:`fseft.adapt.list_methods`).
        task: ``"binary"`` (one sigmoid channel per structure) or ``"multiclass"`` (softmax with background).
        method_config: The method's config dataclass, a dict of its fields, or None for its defaults
            (its ``lr`` is the one learning rate of training and of per-query refinement).
        train_config: Training configuration (paper defaults when None).
        validation: A case id to hold out for validation, True for the next case of the sampling
            permutation, or None.
        transductive: Constrained transductive options (None: plain adaptation); needs a black-box method.
        queries: Unlabelled query cases (manifest path or cases) of batch mode; unused in per-query mode.
        progress: Called after each epoch with an :class:`~fseft.adapt.trainer.EpochReport`.
        support_draw: ``"permutation"`` (fseft's) or ``"reference"`` (the reference code's
            ``random.sample``, on the support cases in their given order; :mod:`fseft.adapt.support`).
        features: Reuse the frozen backbone's windows of support (and batch-mode query) volumes
            from this store, and keep new ones there (black-box methods on the cached path).

    Returns:
        The :class:`AdaptResult` (model in eval mode, record, transductive result).

    Raises:
        ConfigError: unknown method/structure/task, bad config, ``k`` larger than the eligible pool,
            transductive with a method that is not black-box, or batch mode without queries.
        DataError: unreadable manifest or case files, too few non-empty cases, a structure absent
            from every support volume (transductive).
        CheckpointError: an unreadable model file.
    """
    check_task(task)
    names = tuple(canonical(s) for s in ([structures] if isinstance(structures, str) else structures))
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"target structures must be distinct and at least one, got {list(names)}")
    if transductive is not None and transductive.mode == "batch" and queries is None:
        raise ConfigError("transductive batch mode needs query volumes (a manifest of unlabelled cases)")
    mcfg = _method_config(get_method(method), method_config)
    cfg = train_config or AdaptTrainConfig()
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        base = _resolve_model(model, names)
        fingerprint = base.fingerprint()
        preprocess = base.config.preprocess
        cases = _resolve_cases(support)
        chosen = sample_support(
            cases,
            names,
            k,
            seed,
            validation=validation or False,
            has_foreground=foreground_checker(names, preprocess),
            draw=support_draw,
        )
        volumes = load_support_volumes(chosen.support, names, preprocess)
        held = load_support_volumes([chosen.validation], names, preprocess)[0] if chosen.validation else None
        torch.manual_seed(seed)
        adapted = apply_method(base, method, names, task, mcfg, base_fingerprint=fingerprint).to(device)
        path = resolve_path(adapted, cfg.feature_cache)
        tx, constraint = _transductive(adapted, volumes, transductive, queries, features)
        with constraint or contextlib.nullcontext():
            result = fit(adapted, volumes, cfg, lr=adapted.lr or 0.0, seed=seed, path=path, validation=held,
                         device=device, progress=progress, hook=constraint, store=features)  # fmt: skip
        if tx is not None and constraint is not None:
            constraint.record(tx)
    record = AdaptRecord(
        method=method,
        method_config=to_dict(mcfg),
        train_config=to_dict(cfg),
        seed=seed,
        k=k,
        structures=list(names),
        task=task,
        support_case_ids=list(chosen.case_ids),
        validation_case_id=chosen.validation.case_id if chosen.validation else None,
        base_fingerprint=fingerprint,
        trainable_params=adapted.num_trainable(),
        lr=adapted.lr,
        head_lr=_head_lr(adapted),
        path=result.path,
        wall_time_s=time.perf_counter() - start,
        feature_time_s=result.feature_time_s + (tx.feature_time_s if tx else 0.0),
        train_time_s=result.train_time_s,
        peak_memory_bytes=memory.peak,
        memory_kind=memory.kind,
        loss_curve=result.loss_curve,
        val_loss_curve=result.val_loss_curve,
        epochs_run=result.epochs_run,
        stop_reason=result.stop_reason,
        device=str(device),
        support_draw=support_draw,
    )
    logger.info(
        "adapted %s with %s on %d case(s): %d epochs (%s), %.1f s, path %s",
        ",".join(names), method, k, result.epochs_run, result.stop_reason, record.wall_time_s, result.path,
    )  # fmt: skip
    if tx is not None and tx.config.mode == "batch" and tx.constraint_steps == 0:
        logger.warning(
            "training stopped after %d epoch(s), before any constraint step (warm-up %d epochs, "
            "or the first plateau)", record.epochs_run, tx.config.warmup_epochs,
        )  # fmt: skip
    return AdaptResult(adapted, record, tx)


def _transductive(
    adapted: AdaptedModel,
    volumes: Sequence[SupportVolume],
    cfg: TransductiveConfig | None,
    queries: str | os.PathLike[str] | Sequence[Case] | None,
    store: FeatureStore | None,
) -> tuple[TransductiveResult | None, BatchConstraint | None]:
    """The size priors and, in batch mode, the constraint on the queries' features (None: plain)."""
    if cfg is None:
        return None, None
    check_black_box(adapted)
    pre = adapted.base.config.preprocess
    tx = TransductiveResult(cfg, size_priors(volumes, adapted.structures, pre.spacing))
    if cfg.mode != "batch" or queries is None:
        return tx, None
    query_cases = _resolve_cases(queries)
    t0 = time.perf_counter()
    images = load_query_images(query_cases, adapted.structures, pre)
    features = query_features(adapted, images, [c.case_id for c in query_cases], cfg, store=store)
    tx.feature_time_s = time.perf_counter() - t0
    return tx, BatchConstraint(adapted, features, tx.priors, cfg)


def _method_config(method_cls: Any, config: Any | None) -> Any:
    cls = method_cls.config_cls
    if config is None:
        return cls()
    if isinstance(config, dict):
        return from_dict(cls, config)
    if not isinstance(config, cls):
        raise ConfigError(
            f"method {method_cls.name!r} expects a {cls.__name__} config, got {type(config).__name__}"
        )
    return config


def _head_lr(adapted: AdaptedModel) -> float | None:
    """The head's rate where it differs from the rest's (:attr:`AdaptRecord.head_lr`)."""
    if adapted.lr is None:
        return None
    rate = adapted.head_lr(adapted.lr)
    return rate if rate != adapted.lr else None


__all__ = ["AdaptRecord", "AdaptResult", "PeakMemory", "adapt"]

