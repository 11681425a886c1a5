"""``fseft.adapt.api.adapt``: sample a k-shot support set, apply a method, train it, record the run."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import from_dict, to_dict
from ..errors import ConfigError
from ..io_utils import write_json_atomic
from .support import foreground_checker, load_support_volumes, sample_support
from .trainer import AdaptTrainConfig, Progress, fit, resolve_path

if TYPE_CHECKING:
    from ..data.cases import Case
    from ..models import FoundationModel
    from .model import AdaptedModel

#: ``(adapted, support volumes, progress) -> context manager yielding the per-epoch callback``
FitHook = Callable[[Any, Sequence[Any], "Progress | None"], AbstractContextManager["Progress | None"]]

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


def _resolve_model(model: FoundationModel | str | os.PathLike[str]) -> FoundationModel:
    from ..models import FoundationModel, load_model

    return model if isinstance(model, FoundationModel) else load_model(model)


def _resolve_cases(support: str | os.PathLike[str] | Sequence[Case]) -> list[Case]:
    from ..data.manifests import load_manifest

    if isinstance(support, (str, os.PathLike)):
        return load_manifest(support)
    return list(support)


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
    progress: Progress | None = None,
    around_fit: FitHook | None = None,
) -> tuple[AdaptedModel, AdaptRecord]:
    """Adapt a foundation model to new structures from a k-shot support set.

    Silva-Rodríguez, Dolz & Ben Ayed, "Towards Foundation Models and Few-Shot Parameter-Efficient
    Fine-Tuning for Volumetric Organ Segmentation", MedIA 2025.

    Args:
        model: A :class:`~fseft.models.FoundationModel`, a registered model name or a model file.
        support: A manifest path or a list of cases; the support is drawn from the cases annotating
            every target structure (:func:`~fseft.adapt.support.sample_support`).
        structures: Target structure name(s) (synonyms allowed).
        k: Number of support volumes.
        seed: Seed of support sampling, adapter initialisation and crops.
        method: Adaptation method name (:func:`fseft.adapt.list_methods`).
        task: ``"binary"`` (one sigmoid channel per structure) or ``"multiclass"`` (softmax with background).
        method_config: The method's config dataclass, a dict of its fields, or None for its defaults.
        train_config: Training configuration (paper defaults when None).
        validation: A case id to hold out for validation, True for the next case of the sampling
            permutation, or None.
        progress: Called after each epoch with an :class:`~fseft.adapt.trainer.EpochReport`.
        around_fit: Optional context-manager factory ``(adapted, support volumes, progress)`` entered
            around training; what it yields replaces the per-epoch callback (used by transductive
            adaptation to add its query constraint to the supervised steps).

    Returns:
        ``(adapted model in eval mode, record of the run)``.

    Raises:
        ConfigError: unknown method/structure/task, bad config, ``k`` larger than the eligible pool.
        DataError: unreadable manifest or case files, too few non-empty cases.
        CheckpointError: an unreadable model file.
    """
    from ..anatomy import canonical
    from ..runtime import resolve_device
    from .methods import get_method
    from .model import apply_method

    check_task(task)
    names = tuple(canonical(s) for s in ([structures] if isinstance(structures, str) else structures))
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"target structures must be distinct and at least one, got {list(names)}")
    mcfg = _method_config(get_method(method), method_config)
    cfg = train_config or AdaptTrainConfig()
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        base = _resolve_model(model)
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
        )
        volumes = load_support_volumes(chosen.support, names, preprocess)
        held = load_support_volumes([chosen.validation], names, preprocess)[0] if chosen.validation else None
        torch.manual_seed(seed)
        adapted = apply_method(base, method, names, task, mcfg, base_fingerprint=fingerprint).to(device)
        lr = cfg.lr if cfg.lr is not None else adapted.lr
        path = resolve_path(adapted, cfg.feature_cache)
        hook = around_fit(adapted, volumes, progress) if around_fit else contextlib.nullcontext(progress)
        with hook as on_epoch:
            result = fit(
                adapted,
                volumes,
                cfg,
                lr=lr or 0.0,
                seed=seed,
                path=path,
                validation=held,
                device=device,
                progress=on_epoch,
            )
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
        lr=lr,
        path=result.path,
        wall_time_s=time.perf_counter() - start,
        feature_time_s=result.feature_time_s,
        train_time_s=result.train_time_s,
        peak_memory_bytes=memory.peak,
        memory_kind=memory.kind,
        loss_curve=result.loss_curve,
        val_loss_curve=result.val_loss_curve,
        epochs_run=result.epochs_run,
        stop_reason=result.stop_reason,
        device=str(device),
    )
    logger.info(
        "adapted %s with %s on %d case(s): %d epochs (%s), %.1f s, path %s",
        ",".join(names), method, k, result.epochs_run, result.stop_reason, record.wall_time_s, result.path,
    )  # fmt: skip
    return adapted, record


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


__all__ = ["AdaptRecord", "PeakMemory", "adapt"]
