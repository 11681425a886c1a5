"""Writing predictions: the output layout, the overwrite rule, and :func:`predict_files`.

Layout inside the output folder (every file written atomically)::

    <case>.nii.gz                       label map (format "labelmap"): 0 background, i + 1 = structure i
    labels.json                         {"1": "liver", ...}: the names 'fseft evaluate' reads
    <case>/<structure>.nii.gz           one binary mask per structure (format "masks", TotalSegmentator-style)
    <case>_probabilities/<structure>.nii.gz   probability maps (optional): uint8 scaled by 1/255 in the
                                        NIfTI header (readers get floats in [0, 1]) or float32

Masks are the label map split per structure, so they never overlap. NIfTI has no float16 type,
hence the uint8 encoding (resolution 1/255) as the compact choice.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from ..data.image import Image
from ..data.io import read_image, write_image
from ..errors import ConfigError
from ..io_utils import atomic_path, write_json_atomic
from .inputs import PredictInput, find_inputs
from .predictor import PredictConfig, Prediction, WindowProgress, describe_model, predict_image

#: Label names beside label maps (the file ``fseft evaluate`` reads).
LABELS_JSON = "labels.json"
FORMATS: tuple[str, ...] = ("labelmap", "masks")
PROBABILITY_DTYPES: tuple[str, ...] = ("uint8", "float32")

#: ``(index, number of inputs, input)`` before each input is predicted.
CaseProgress = Callable[[int, int, PredictInput], None]
#: ``(case name, preprocessed [1, X, Y, Z] image)`` before the case is predicted (see ``RefineHook``).
CaseRefineHook = Callable[[str, torch.Tensor], object]


@dataclass(frozen=True)
class OutputConfig:
    """Where and how predictions are written.

    Args:
        out: Output folder.
        format: ``"labelmap"`` (``<case>.nii.gz`` + ``labels.json``) or ``"masks"`` (``<case>/<structure>.nii.gz``).
        probabilities: Also write probability maps, as ``"uint8"`` (scaled) or ``"float32"``; ``None``: not.
        overwrite: Replace existing outputs (otherwise they are refused before anything runs).
    """

    out: Path
    format: str = "labelmap"
    probabilities: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown output format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if self.probabilities is not None and self.probabilities not in PROBABILITY_DTYPES:
            raise ConfigError(
                f"unknown probability type {self.probabilities!r}; choose one of: {', '.join(PROBABILITY_DTYPES)}"
            )


def labels_mapping(structures: Sequence[str]) -> dict[str, str]:
    """The ``labels.json`` content: ``{"1": structures[0], ...}``."""
    return {str(i + 1): name for i, name in enumerate(structures)}


def output_files(case: str, structures: Sequence[str], output: OutputConfig) -> list[Path]:
    """Every file written for one case (``labels.json`` excepted)."""
    if output.format == "labelmap":
        files = [output.out / f"{case}.nii.gz"]
    else:
        files = [output.out / case / f"{name}.nii.gz" for name in structures]
    if output.probabilities is not None:
        files += [output.out / f"{case}_probabilities" / f"{name}.nii.gz" for name in structures]
    return files


def check_outputs(output: OutputConfig, cases: Sequence[str], structures: Sequence[str]) -> None:
    """Refuse, before anything is computed, outputs that exist (unless ``overwrite``).

    An existing ``labels.json`` with the same content is not a conflict.

    Raises:
        ConfigError: Naming the first existing output file, a structure name unusable as a file
            name, or an output path that is a file.
    """
    if output.out.exists() and not output.out.is_dir():
        raise ConfigError(f"{output.out}: the output must be a folder, not a file")
    bad = [s for s in structures if not s or s.startswith(".") or os.sep in s or "/" in s]
    if bad:
        raise ConfigError(f"structure name(s) {bad} cannot be used as file names")
    if output.overwrite:
        return
    for case in cases:
        for path in output_files(case, structures, output):
            if path.exists():
                raise ConfigError(f"{path}: already exists; pass --overwrite to replace it")
    labels = output.out / LABELS_JSON
    if output.format == "labelmap" and labels.exists() and _read_json(labels) != labels_mapping(structures):
        raise ConfigError(f"{labels}: already exists with other label names; pass --overwrite to replace it")


def write_prediction(prediction: Prediction, case: str, output: OutputConfig) -> list[Path]:
    """Write one case's prediction in the requested layout.

    Args:
        prediction: The prediction (on the input grid).
        case: Case name.
        output: Layout and folder.

    Returns:
        The files written (``labels.json`` included for label maps).

    Raises:
        ConfigError: Probabilities were requested but the prediction does not hold them.
    """
    label, structures = prediction.label, prediction.structures
    written: list[Path] = []
    if output.format == "labelmap":
        path = output.out / f"{case}.nii.gz"
        write_image(label, path)
        write_json_atomic(output.out / LABELS_JSON, labels_mapping(structures))
        written += [path, output.out / LABELS_JSON]
    else:
        for i, name in enumerate(structures):
            path = output.out / case / f"{name}.nii.gz"
            write_image(label.with_array(label.array == i + 1), path, dtype=np.uint8)
            written.append(path)
    if output.probabilities is not None:
        if prediction.probabilities is None:
            raise ConfigError("probability maps were requested but the prediction was made without them")
        for name in structures:
            path = output.out / f"{case}_probabilities" / f"{name}.nii.gz"
            _write_probability(prediction.probabilities[name], path, output.probabilities)
            written.append(path)
    return written


def predict_files(
    model: nn.Module,
    inputs: Sequence[str | os.PathLike[str] | PredictInput],
    output: OutputConfig,
    *,
    config: PredictConfig | None = None,
    on_case: CaseProgress | None = None,
    progress: WindowProgress | None = None,
    refine: CaseRefineHook | None = None,
) -> list[Path]:
    """Predict files, folders, DICOM series or manifest cases and write the results.

    Existing outputs are refused (unless ``output.overwrite``) before any image is read. Each case is
    written as soon as it is predicted; a failing case stops the run (earlier cases stay written).

    Args:
        model: A :class:`~fseft.models.FoundationModel` or :class:`~fseft.adapt.AdaptedModel`.
        inputs: Paths (expanded by :func:`~fseft.inference.inputs.find_inputs`) or prepared inputs.
        output: Output folder and layout.
        config: Inference options (``probabilities`` is set from ``output``).
        on_case: Called before each input with ``(index, count, input)``.
        progress: Window progress within the current input (see :func:`predict_image`).
        refine: Called with each case's name and preprocessed image before it is predicted (e.g.
            :meth:`fseft.adapt.transductive.PerQueryRefiner.refine`).

    Returns:
        Every file written.

    Raises:
        DataError: A missing or unreadable input.
        ConfigError: An existing output without ``overwrite``, or a bad option.
    """
    items = [i for i in inputs if isinstance(i, PredictInput)]
    paths = [i for i in inputs if not isinstance(i, PredictInput)]
    items += find_inputs(paths) if paths else []
    structures = describe_model(model)[0]
    check_outputs(output, [i.name for i in items], structures)
    config = replace(config or PredictConfig(), probabilities=output.probabilities is not None)
    written: list[Path] = []
    for index, item in enumerate(items):
        if on_case is not None:
            on_case(index, len(items), item)
        hook = None if refine is None else functools.partial(refine, item.name)
        prediction = predict_image(model, read_image(item.path), config=config, progress=progress, refine=hook)
        written += write_prediction(prediction, item.name, output)
    return written


def _write_probability(image: Image, path: Path, dtype: str) -> None:
    if dtype == "float32":
        write_image(image, path, dtype=np.float32)
        return
    scaled = np.rint(np.clip(image.array, 0.0, 1.0) * 255.0).astype(np.uint8)
    nifti = nib.Nifti1Image(scaled, image.affine)
    nifti.set_sform(image.affine, code=1)
    nifti.set_qform(image.affine, code=1)
    nifti.header.set_xyzt_units("mm", "sec")
    nifti.header.set_slope_inter(1.0 / 255.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(nifti, tmp)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
