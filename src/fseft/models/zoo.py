"""Registry of public pretrained checkpoints (the paper's foundation model and the ones it compares to).

Each entry keeps the weights' URL with what they need: backbone config, key layout, label template
(structure of each head row) and preprocessing. Files are cached under ``$FSEFT_CACHE`` (default
``~/.cache/fseft``) by :func:`download_entry` (``fseft zoo download NAME``); :func:`load_zoo_model`
only reads the cache, it never downloads.

No publisher of these files lists a sha256 or a file size, and fseft has not pinned them itself, so
every entry is *unpinned* (``sha256`` and ``size`` are ``None``): downloads are checked for
completeness (the server's length) but not for integrity. An entry with a ``size`` or ``sha256`` is
verified against it. Every SwinUNETR entry is built with MONAI v0.9's patch merging
(``swin_merging="legacy"``), the one its weights were trained with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..anatomy import UNIVERSAL_29
from ..config import PreprocessConfig
from ..errors import CheckpointError, ConfigError
from ..registry import Registry
from .checkpoint import LoadReport, load_pretrained
from .config import ModelConfig
from .download import ProgressFn, download
from .foundation import FoundationModel, build_model

# BTCV's 13 organs are the first 13 structures of the paper's universal template, in the same order.
_BTCV_13 = UNIVERSAL_29[:13]
_PAPER = PreprocessConfig(spacing=(1.5, 1.5, 1.5), hu_window=(-175.0, 250.0), roi=(96, 96, 96))
_HF = "https://huggingface.co/MrGiovanni/SuPreM/resolve/main/"
_MONAI = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"


@dataclass(frozen=True)
class ZooEntry:
    """One public checkpoint.

    Args:
        name: Registry name (``<arch><width>.<origin>``).
        description: What the weights are.
        url: Direct download URL.
        page: Where the link is published.
        filename: Cache file name.
        sha256: Expected checksum, or ``None`` when none is known (unpinned).
        size: Expected file size in bytes, or ``None`` when unknown.
        arch: Backbone name.
        feature_size: Backbone width.
        layout: Key layout (:data:`fseft.models.keymaps.LAYOUTS`).
        label_template: Structure of each row of the checkpoint's static head (``None`` for
            background); empty when the checkpoint has no per-structure head.
        preprocess: Preprocessing the weights were trained with.
        citation: Paper to cite.
        swin_merging: SwinUNETR patch merging the weights were trained with
            (:attr:`fseft.models.ModelConfig.swin_merging`); ``None`` for UNets.
    """

    name: str
    description: str
    url: str
    page: str
    filename: str
    sha256: str | None
    arch: str
    feature_size: int
    layout: str
    label_template: tuple[str | None, ...]
    preprocess: PreprocessConfig
    citation: str
    swin_merging: str | None
    size: int | None = None

    @property
    def pinned(self) -> str:
        """``"sha256"``, ``"size"`` or ``"unpinned"``: what a download is verified against."""
        return "sha256" if self.sha256 else "size" if self.size else "unpinned"

    @property
    def structures(self) -> tuple[str, ...]:
        """Structures the checkpoint's head segments (empty when it has no static head)."""
        return tuple(s for s in self.label_template if s is not None)


ZOO: Registry[ZooEntry] = Registry("zoo checkpoint")

for _entry in (
    ZooEntry(
        name="swinunetr48.fseft",
        description="FSEFT foundation model: SwinUNETR supervised-pretrained on 2,042 CT of 9 datasets, 29 structures",
        url="https://drive.google.com/uc?export=download&id=18yLNxmWGnVifQNeYYwyyu56Cg4tWV9aW",
        page="https://github.com/jusiro/fewshot-finetuning#22-pre-trained-models",
        filename="fseft_swinunetr48.pth",
        sha256=None,
        arch="swinunetr",
        feature_size=48,
        layout="fseft-reference",
        label_template=UNIVERSAL_29,
        preprocess=_PAPER,
        citation="Silva-Rodríguez, Dolz & Ben Ayed, Medical Image Analysis 2025 (arXiv 2303.17051)",
        swin_merging="legacy",
    ),
    ZooEntry(
        name="swinunetr48.clip-driven",
        description="CLIP-Driven Universal Model SwinUNETR backbone (2,100 CT; text-driven dynamic heads dropped)",
        url=_HF + "supervised_clip_driven_universal_swin_unetr_2100.pth",
        page="https://github.com/MrGiovanni/SuPreM#a-suite-of-pre-trained-models-suprem",
        filename="supervised_clip_driven_universal_swin_unetr_2100.pth",
        sha256=None,
        arch="swinunetr",
        feature_size=48,
        layout="universal-model-swin",
        label_template=(),
        preprocess=_PAPER,
        citation="Liu et al., CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection, ICCV 2023",
        swin_merging="legacy",
    ),
    ZooEntry(
        name="swinunetr48.suprem",
        description="SuPreM SwinUNETR backbone (AbdomenAtlas, 2,100 CT; dynamic heads dropped)",
        url=_HF + "supervised_suprem_swinunetr_2100.pth",
        page="https://github.com/MrGiovanni/SuPreM#a-suite-of-pre-trained-models-suprem",
        filename="supervised_suprem_swinunetr_2100.pth",
        sha256=None,
        arch="swinunetr",
        feature_size=48,
        layout="universal-model-swin",
        label_template=(),
        preprocess=_PAPER,
        citation="Li, Yuille & Zhou, How Well Do Supervised 3D Models Transfer to Medical Imaging Tasks?, ICLR 2024",
        swin_merging="legacy",
    ),
    ZooEntry(
        name="unet3d.suprem",
        description="SuPreM 3D UNet backbone (AbdomenAtlas, 2,100 CT; 64 output features; dynamic heads dropped)",
        url=_HF + "supervised_suprem_unet_2100.pth",
        page="https://github.com/MrGiovanni/SuPreM#a-suite-of-pre-trained-models-suprem",
        filename="supervised_suprem_unet_2100.pth",
        sha256=None,
        arch="unet3d",
        feature_size=64,
        layout="universal-model-unet",
        label_template=(),
        preprocess=_PAPER,
        citation="Li, Yuille & Zhou, How Well Do Supervised 3D Models Transfer to Medical Imaging Tasks?, ICLR 2024",
        swin_merging=None,
    ),
    ZooEntry(
        name="swinunetr48.monai-ssl",
        description="MONAI self-supervised Swin encoder (5,050 CT; encoder only, decoder and head new)",
        url=_MONAI + "model_swinvit.pt",
        page="https://github.com/Project-MONAI/research-contributions/tree/main/SwinUNETR/BTCV#models",
        filename="model_swinvit.pt",
        sha256=None,
        arch="swinunetr",
        feature_size=48,
        layout="monai-ssl-swin",
        label_template=(),
        preprocess=PreprocessConfig(spacing=(1.5, 1.5, 2.0), hu_window=(-1000.0, 1000.0), roi=(96, 96, 96)),
        citation="Tang et al., Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis, CVPR 2022",
        swin_merging="legacy",
    ),
    ZooEntry(
        name="swinunetr48.monai-btcv",
        description="MONAI SwinUNETR/Base fine-tuned on BTCV (13 abdominal organs + background)",
        url=_MONAI + "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",
        page="https://github.com/Project-MONAI/research-contributions/tree/main/SwinUNETR/BTCV#models",
        filename="swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",
        sha256=None,
        arch="swinunetr",
        feature_size=48,
        layout="monai-btcv-swin",
        label_template=(None, *_BTCV_13),
        preprocess=PreprocessConfig(spacing=(1.5, 1.5, 2.0), hu_window=(-175.0, 250.0), roi=(96, 96, 96)),
        citation="Tang et al., CVPR 2022; Hatamizadeh et al., Swin UNETR, BrainLes 2021",
        swin_merging="legacy",
    ),
):
    ZOO.add(_entry.name, _entry)


def get_entry(name: str) -> ZooEntry:
    """The zoo entry ``name``.

    Raises:
        ConfigError: listing the zoo names when ``name`` is unknown.
    """
    return ZOO.get(name)


def default_cache_dir() -> Path:
    """``$FSEFT_CACHE`` if set, else ``~/.cache/fseft``."""
    env = os.environ.get("FSEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fseft"


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where zoo checkpoint ``name`` is (or would be) cached."""
    return Path(cache_dir or default_cache_dir()) / get_entry(name).filename


def download_entry(
    name: str, cache_dir: str | os.PathLike[str] | None = None, progress: ProgressFn | None = None
) -> Path:
    """Download zoo checkpoint ``name`` into the cache (resuming a partial download).

    Raises:
        ConfigError: unknown name.
        CheckpointError: network failure, web page instead of file, or size/checksum mismatch.
    """
    entry = get_entry(name)
    return download(
        entry.url, cached_path(name, cache_dir), sha256=entry.sha256, size=entry.size, progress=progress
    )


def load_zoo_model(
    name: str,
    *,
    structures: tuple[str, ...] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_partial: bool = False,
) -> FoundationModel:
    """Build the zoo model ``name`` and load its cached weights (never downloads).

    Args:
        name: Zoo entry.
        structures: Head structures; defaults to the checkpoint's own. Rows of structures the
            checkpoint knows are copied; the others have no trained weights (listed in
            ``extra["untrained_head_rows"]``; zero-shot refuses them).
        cache_dir: Cache directory (default :func:`default_cache_dir`).
        allow_partial: Load even when the file does not fit the entry's layout
            (:func:`~fseft.models.checkpoint.load_pretrained`).

    Returns:
        The model; its ``extra["load_report"]`` holds the :class:`LoadReport` summary and
        ``extra["load_warnings"]`` one line per kind of difference.

    Raises:
        CheckpointError: when the file is not downloaded yet, unsafe, or does not fit the layout.
        ConfigError: unknown name, or no ``structures`` for a checkpoint without a static head.
    """
    entry = get_entry(name)
    path = cached_path(name, cache_dir)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: zoo checkpoint {name!r} is not downloaded; run 'fseft zoo download {name}'"
        )
    chosen = structures or entry.structures
    if not chosen:
        raise ConfigError(
            f"zoo checkpoint {name!r} has no per-structure head: name the structures to segment "
            "(fseft adapt --structure, or structures=(...))"
        )
    cfg = ModelConfig(
        arch=entry.arch,
        feature_size=entry.feature_size,
        structures=chosen,
        preprocess=entry.preprocess,
        swin_merging=entry.swin_merging or "current",
    )
    with torch.random.fork_rng(devices=[]):  # what the file lacks starts the same on every load, so the
        torch.manual_seed(0)  # model's fingerprint (which adapter files check) is reproducible
        model = build_model(cfg)
    report: LoadReport = load_pretrained(
        model,
        path,
        entry.layout,
        allow_partial=allow_partial,
        label_template=entry.label_template or None,
        source_name=f"{path} ({name})",
    )
    model.extra |= {"zoo": name, "load_report": report.summary(), "load_warnings": report.warnings()}
    return model
