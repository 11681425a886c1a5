"""Pre-train a foundation model from a typed job: assembly -> preprocessed datasets -> loop -> model file.

The one road of ``fseft pretrain`` and of the benchmark's model ``build`` recipe. Run it inside a
:func:`~fseft.runtime.distributed_session` (one process, or every rank under ``torchrun``):
:func:`prepare_pretraining` resolves the assembly, builds the model and the datasets and fills the
preprocessed-volume cache (ranks share the work); :meth:`PreparedPretraining.run` trains and writes
``OUT/model.pt`` (rank 0). :func:`pretrain_foundation` does both in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig, to_dict
from ..data.dataset import CachedCaseDataset
from ..models import FoundationModel, ModelConfig, build_model, save_model
from ..runtime import DistContext, barrier, distributed_session, seed_everything
from .assembly import Assembly, AssemblyConfig, data_key, resolve_assembly
from .config import TrainConfig
from .pretrain import StepReport, TrainResult, pretrain

log = logging.getLogger(__name__)

#: ``(cases done, cases in total)`` on this rank while the preprocessed-volume cache fills.
CacheProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class PretrainJob:
    """What to pre-train and where.

    Args:
        assembly: The datasets (:mod:`fseft.training.assembly`).
        preprocess: The model's preprocessing (spacing, ROI, crops per volume, augmentation).
        train: The training configuration.
        out: Output folder (``model.pt``, ``checkpoint.pt``, ``train_log.jsonl``).
        arch: Backbone name.
        feature_size: Backbone width.
        grad_checkpoint: Gradient checkpointing (SwinUNETR only; ignored with a warning otherwise).
        cache_dir: Preprocessed-volume cache (default ``OUT/cache``).
        resume: Continue exactly from ``OUT/checkpoint.pt``.
    """

    assembly: AssemblyConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    out: Path
    arch: str = "swinunetr"
    feature_size: int = 48
    grad_checkpoint: bool = False
    cache_dir: Path | None = None
    resume: bool = False

    @property
    def cache_path(self) -> Path:
        """The preprocessed-volume cache folder (``cache_dir`` or ``OUT/cache``)."""
        return self.cache_dir or self.out / "cache"


@dataclass
class PretrainOutcome:
    """What :meth:`PreparedPretraining.run` did.

    Args:
        result: The loop's result (trained model, steps, validation Dice).
        path: The model file written (None on ranks other than 0).
    """

    result: TrainResult
    path: Path | None


@dataclass
class PreparedPretraining:
    """A pre-training run ready to start: model built, datasets cached.

    Args:
        job: The job.
        ctx: The distributed context it runs in.
        assembly: The resolved assembly.
        model_cfg: The model's configuration.
        model: The freshly initialised model.
        sources: One training dataset per assembly group.
        val: The validation dataset.
    """

    job: PretrainJob
    ctx: DistContext
    assembly: Assembly
    model_cfg: ModelConfig
    model: FoundationModel
    sources: list[CachedCaseDataset]
    val: CachedCaseDataset

    @property
    def summary(self) -> str:
        """One line: structures, datasets, cases, parameters, processes."""
        return (
            f"pretrain: {len(self.model.structures)} structures, {len(self.sources)} datasets "
            f"({sum(len(s) for s in self.sources)} cases), {len(self.val)} validation cases, "
            f"{self.model.num_parameters() / 1e6:.2f} M parameters, {self.ctx.world_size} process(es) on {self.ctx.device}"
        )

    def run(
        self, *, extra: dict[str, Any] | None = None, callback: Callable[[StepReport], None] | None = None
    ) -> PretrainOutcome:
        """Train, then (rank 0) write ``OUT/model.pt`` with the run's provenance.

        Args:
            extra: More provenance for the model file (e.g. the command line).
            callback: Called on rank 0 after every step.

        Raises:
            CheckpointError: resuming from an unreadable or mismatched checkpoint.
            ConfigError: an existing checkpoint without ``resume``.
        """
        job, train = self.job, self.job.train
        run_key = {"model": self.model_cfg.to_dict(), "data": data_key(self.assembly)}
        result = pretrain(
            self.model, self.sources, self.model.structures, train, job.out, ctx=self.ctx,
            weights=self.assembly.weights, val_samples=self.val, roi=job.preprocess.roi, resume=job.resume,
            run_key=run_key, callback=callback,
        )  # fmt: skip
        if not self.ctx.is_main:
            return PretrainOutcome(result, None)
        record = {
            **(extra or {}),
            "seed": train.seed,
            "data": to_dict(job.assembly),
            "datasets": {name: len(cases) for name, cases in self.assembly.groups},
            "train": to_dict(train),
            "steps": result.step,
            "elapsed_s": round(result.elapsed_s, 1),
            "val_dice": result.val_dice,
        }
        return PretrainOutcome(result, save_model(result.model, job.out / "model.pt", record))


def prepare_pretraining(
    job: PretrainJob, ctx: DistContext, *, on_cache: CacheProgress | None = None
) -> PreparedPretraining:
    """Resolve the assembly, build the model and fill this rank's share of the preprocessed cache.

    Raises:
        ConfigError: an invalid assembly or model configuration.
        DataError: unreadable manifests or cases.
    """
    if job.grad_checkpoint and job.arch != "swinunetr":
        log.warning("--grad-checkpoint applies to SwinUNETR only: ignored for %s", job.arch)
    cache_dir = job.cache_path
    assembly = resolve_assembly(job.assembly, job.train.seed)
    model_cfg = ModelConfig(
        arch=job.arch, feature_size=job.feature_size, structures=assembly.structures,
        preprocess=job.preprocess, use_checkpoint=job.grad_checkpoint,
    )  # fmt: skip
    seed_everything(job.train.seed)
    model = build_model(model_cfg)
    structures = model.structures
    sources = [
        CachedCaseDataset(cases, structures, job.preprocess, cache_dir, "train") for _, cases in assembly.groups
    ]
    val = CachedCaseDataset(assembly.val_cases, structures, job.preprocess, cache_dir, "eval")
    jobs = [(ds, case) for ds in [*sources, val] for case in ds.cases][ctx.rank :: ctx.world_size]
    for i, (ds, case) in enumerate(jobs):
        ds.cache.get(case)
        if on_cache is not None:
            on_cache(i + 1, len(jobs))
    barrier(ctx)
    return PreparedPretraining(job, ctx, assembly, model_cfg, model, sources, val)


def pretrain_foundation(job: PretrainJob, *, extra: dict[str, Any] | None = None) -> PretrainOutcome:
    """:func:`prepare_pretraining` then :meth:`PreparedPretraining.run`, in a distributed session of its own."""
    with distributed_session(job.train.device) as ctx:
        prepared = prepare_pretraining(job, ctx)
        log.info(prepared.summary)
        return prepared.run(extra=extra)


__all__ = [
    "CacheProgress",
    "PreparedPretraining",
    "PretrainJob",
    "PretrainOutcome",
    "prepare_pretraining",
    "pretrain_foundation",
]
