"""MONAI dictionary transforms that turn a :class:`~fseft.data.cases.Case` into model-ready tensors.

The pipeline follows the MONAI SwinUNETR BTCV recipe the paper uses (Silva-Rodríguez et al., MedIA
2025): reorient, resample, window the Hounsfield units to ``[0, 1]``, crop to the body, then (training
only) draw positive/negative ROI crops and apply light augmentations.

Keys: ``image`` (1xXxYxZ float), ``label`` (1xXxYxZ index map: 0 background, ``i + 1`` =
``structures[i]``; training crops turn it into S binary channels), ``annotated`` (bool ``[S]``: which
structures are labelled in this case; the others are *unknown*, never background) and ``case_id``.

The deterministic part (:func:`preprocess_transforms`) is what the on-disk cache of
:mod:`fseft.data.dataset` stores; the random part (:func:`sampling_transforms`) runs at every step.
In ``eval`` and ``infer`` modes every spatial step is recorded in the ``MetaTensor`` so predictions can
be mapped back to the input grid with ``monai.transforms.Invertd``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandRotate90d,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transform,
)

from ..config import PreprocessConfig
from ..errors import ConfigError, DataError, FseftError
from . import io as data_io
from .cases import Case
from .validate import validate_ct

Mode = Literal["train", "eval", "infer"]
MODES: tuple[str, ...] = ("train", "eval", "infer")

#: Voxels of margin kept around the body when cropping to the foreground.
BODY_MARGIN = 4


def _to_metatensor(array: np.ndarray, affine: np.ndarray, filename: str, dtype: torch.dtype) -> MetaTensor:
    """A channel-first MetaTensor carrying the voxel->RAS affine MONAI's spatial transforms read."""
    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    tensor = MetaTensor(torch.as_tensor(np.ascontiguousarray(array)).to(dtype)[None], affine=aff.clone())
    tensor.meta["original_affine"] = aff.clone()
    tensor.meta["spatial_shape"] = torch.as_tensor(array.shape)
    tensor.meta["filename_or_obj"] = filename
    return tensor


class LoadCased(MapTransform):
    """Read the :class:`Case` under ``keys`` into ``image``, ``label``, ``annotated`` and ``case_id``.

    Labels go through :func:`fseft.data.io.load_case` (templates, partial labels, geometry checks);
    with ``with_label=False`` (inference) only the image is read. Either way the image goes through
    :func:`fseft.data.validate.validate_ct` as it is read.

    Args:
        structures: Model structure names; label value ``i + 1`` is ``structures[i]``.
        keys: Key holding the :class:`Case` (removed from the output, which must stay collatable).
        with_label: Also read the labels into ``label`` and ``annotated``.
        allow_missing_keys: Skip silently when the case key is absent.
        preprocess: The preprocessing that follows (for the validation's resampled-size bound).

    Raises:
        DataError: when ``with_label`` and the case has no label, or a reader or the validation
            rejects a file.
    """

    def __init__(
        self,
        structures: Sequence[str],
        keys: str = "case",
        with_label: bool = True,
        allow_missing_keys: bool = False,
        preprocess: PreprocessConfig | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.structures = tuple(structures)
        self.with_label = with_label
        self.preprocess = preprocess

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            case: Case = d.pop(key)
            d["case_id"] = case.case_id
            if not self.with_label:
                image = validate_ct(data_io.read_image(case.image), preprocess=self.preprocess)
                d["image"] = _to_metatensor(image.array, image.affine, str(case.image), torch.float32)
                continue
            if not case.has_label:
                raise DataError(
                    f"{case.image}: case {case.case_id!r} has no label source but labels are required"
                )
            volume = data_io.load_case(case, self.structures, preprocess=self.preprocess)
            d["image"] = _to_metatensor(
                volume.image.array, volume.image.affine, str(case.image), torch.float32
            )
            d["label"] = _to_metatensor(
                volume.label, volume.image.affine, str(case.labels[0].path), torch.uint8
            )
            d["annotated"] = torch.as_tensor(np.asarray(volume.annotated, dtype=bool))
        return d


def _raw(x: Any) -> torch.Tensor:
    """The plain tensor under a MetaTensor (no metadata tracking on intermediate ops)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class KeepAnnotatedd(MapTransform):
    """Zero the index-map voxels of structures this case does not annotate.

    Training crops sample positives from ``label > 0``; after this transform those are voxels of
    annotated structures only. The loss ignores unannotated channels, so nothing else changes.

    Args:
        keys: Index-map keys (1xXxYxZ integers).
        annotated_key: Key of the bool ``[S]`` annotation mask.
        allow_missing_keys: Skip absent keys.
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "label",
        annotated_key: str = "annotated",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.annotated_key = annotated_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        annotated = torch.as_tensor(d[self.annotated_key], dtype=torch.bool)
        for key in self.key_iterator(d):
            label = d[key]
            raw = _raw(label)
            values = torch.arange(1, len(annotated) + 1, dtype=raw.dtype)[annotated]
            kept = torch.where(torch.isin(raw, values), raw, torch.zeros((), dtype=raw.dtype))
            d[key] = label.clone().copy_(kept) if isinstance(label, MetaTensor) else kept
        return d


def index_to_channels(label: torch.Tensor, num_structures: int) -> torch.Tensor:
    """S binary float channels from a 1xXxYxZ index map (channel ``i`` is ``label == i + 1``).

    Args:
        label: Index map with a leading channel dimension of size 1.
        num_structures: Number of structures S.

    Returns:
        Tensor ``S x X x Y x Z`` of 0/1 floats (a MetaTensor keeps its metadata).
    """
    if label.shape[0] != 1:
        raise ValueError(f"expected a 1-channel index map, got shape {tuple(label.shape)}")
    values = torch.arange(1, num_structures + 1, device=label.device).view(-1, *([1] * (label.ndim - 1)))
    channels = (_raw(label) == values).float()
    if isinstance(label, MetaTensor):
        return MetaTensor(channels, meta=label.meta, applied_operations=label.applied_operations)
    return channels


class IndexToChannelsd(MapTransform):
    """Replace a 1xXxYxZ index map by ``num_structures`` binary float channels (structures order).

    Args:
        keys: Index-map keys.
        num_structures: Number of structures S (channel ``i`` is label value ``i + 1``).
        allow_missing_keys: Skip absent keys.
    """

    def __init__(
        self, keys: str | Sequence[str], num_structures: int, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_structures = num_structures

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = index_to_channels(d[key], self.num_structures)
        return d


class Pipeline(Compose):
    """A ``Compose`` that lets fseft's one-line user errors through.

    MONAI wraps any exception raised inside a transform in ``RuntimeError("applying transform ...")``;
    a :class:`~fseft.errors.FseftError` (an unreadable file, a case without labels) is re-raised as
    itself so the CLI can report it in one line.
    """

    def __call__(
        self,
        input_: Any,
        start: int = 0,
        end: int | None = None,
        threading: bool = False,
        lazy: bool | None = None,
    ) -> Any:
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as e:
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, FseftError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


def _is_body(x: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: windowed intensity above the window's lower bound."""
    return x > 0


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown preprocessing mode {mode!r}; choose one of: {', '.join(MODES)}")


def preprocess_transforms(cfg: PreprocessConfig, structures: Sequence[str], mode: Mode) -> list[Transform]:
    """The deterministic, invertible part of the pipeline (what the on-disk cache stores).

    ``LoadCased`` -> ``Orientationd`` -> ``Spacingd`` (bilinear image, nearest label) ->
    ``ScaleIntensityRanged`` (HU window to ``[0, 1]``, clipped) -> ``CropForegroundd`` (body) ->
    ``SpatialPadd`` (to at least the ROI). ``infer`` mode handles the image only.

    Args:
        cfg: Preprocessing configuration.
        structures: Model structure names (label value ``i + 1`` is ``structures[i]``).
        mode: ``"train"``, ``"eval"`` or ``"infer"``.

    Returns:
        The transforms, in order.

    Raises:
        ConfigError: on an unknown mode.
    """
    _check_mode(mode)
    with_label = mode != "infer"
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    lo, hi = cfg.hu_window
    steps: list[Transform] = [
        LoadCased(structures, with_label=with_label, preprocess=cfg),
        Orientationd(keys, axcodes=cfg.orientation, labels=None),
        Spacingd(keys, pixdim=cfg.spacing, mode=modes),
        ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if cfg.crop_foreground:
        steps.append(
            CropForegroundd(
                keys,
                source_key="image",
                select_fn=_is_body,
                margin=BODY_MARGIN,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    steps.append(SpatialPadd(keys, spatial_size=cfg.roi))
    if with_label:
        steps.append(CastToTyped("label", dtype=torch.uint8))
    return steps


def sampling_transforms(cfg: PreprocessConfig, structures: Sequence[str], mode: Mode) -> list[Transform]:
    """The random part: training crops, augmentations and the index map -> channels step.

    Empty for ``eval`` / ``infer`` (their label stays an invertible index map; see
    :func:`index_to_channels`).

    Args:
        cfg: Preprocessing configuration (``roi``, ``pos``, ``neg``, ``num_samples``, ``augment``,
            ``spatial_augment``).
        structures: Model structure names.
        mode: ``"train"``, ``"eval"`` or ``"infer"``.

    Returns:
        The transforms, in order.

    Raises:
        ConfigError: on an unknown mode.
    """
    _check_mode(mode)
    if mode != "train":
        return []
    keys = ["image", "label"]
    steps: list[Transform] = [
        KeepAnnotatedd("label"),
        # Class-balanced positives: the ``pos`` share is split evenly over the structures, so small
        # organs are centred as often as the liver (a structure absent from the case gets none). The
        # background keeps a tiny share even at neg=0, so a case with nothing annotated still crops.
        RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=cfg.roi,
            ratios=[max(cfg.neg, 1e-6)] + [cfg.pos / len(structures)] * len(structures),
            num_classes=len(structures) + 1,
            num_samples=cfg.num_samples,
            image_key="image",
            image_threshold=0.0,
            warn=False,
        ),
    ]
    if cfg.augment and cfg.spatial_augment:
        steps += [RandFlipd(keys, prob=0.1, spatial_axis=axis) for axis in range(3)]
        steps.append(RandRotate90d(keys, prob=0.1, max_k=3))
    if cfg.augment:
        steps.append(RandShiftIntensityd("image", offsets=0.1, prob=0.5))
    steps.append(IndexToChannelsd("label", num_structures=len(structures)))
    return steps


def build_transforms(cfg: PreprocessConfig, structures: Sequence[str], mode: Mode) -> Pipeline:
    """The full preprocessing pipeline for one mode, applied to ``{"case": Case}``.

    Args:
        cfg: Preprocessing configuration.
        structures: Model structure names (label value ``i + 1`` is ``structures[i]``).
        mode: ``"train"`` (returns a list of ``cfg.num_samples`` ROI crops with S-channel labels),
            ``"eval"`` (whole preprocessed volume, index-map label) or ``"infer"`` (image only).

    Returns:
        A :class:`Pipeline` (a ``monai.transforms.Compose``); its ``inverse`` / ``Invertd`` maps outputs back to the input grid.

    Raises:
        ConfigError: on an unknown mode.
    """
    return Pipeline(preprocess_transforms(cfg, structures, mode) + sampling_transforms(cfg, structures, mode))


__all__ = [
    "MODES",
    "Mode",
    "LoadCased",
    "Pipeline",
    "KeepAnnotatedd",
    "IndexToChannelsd",
    "index_to_channels",
    "preprocess_transforms",
    "sampling_transforms",
    "build_transforms",
]
