"""Writing predictions: the output formats, the overwrite rule, and :func:`predict_files`.

Each requested output format (:mod:`fseft.inference.formats`: ``nifti``, ``dicom-seg``,
``rtstruct``) writes its own files into the output folder, every file atomically. Formats that
reference a source DICOM series are only accepted for DICOM series inputs, and every such series is
read and checked before any prediction runs, so a refused input leaves nothing written.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..data.dicom_series import DicomSeries, read_series
from ..data.io import read_image
from ..errors import ConfigError, DataError, FseftError
from ..models.feature_store import FeatureStore
from .formats import LABELS_JSON, OUTPUT_FORMATS, Provenance, get_format, labels_mapping
from .inputs import PredictInput, find_inputs
from .predictor import PredictConfig, Prediction, WindowProgress, describe_model, predict_image

#: NIfTI layouts.
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
        format: NIfTI layout: ``"labelmap"`` (``<case>.nii.gz`` + ``labels.json``) or ``"masks"``
            (``<case>/<structure>.nii.gz``).
        probabilities: Also write probability maps, as ``"uint8"`` (scaled) or ``"float32"``; ``None``: not.
        overwrite: Replace existing outputs (otherwise they are refused before anything runs).
        formats: Output formats (:data:`fseft.inference.formats.OUTPUT_FORMATS`), in writing order.
    """

    out: Path
    format: str = "labelmap"
    probabilities: str | None = None
    overwrite: bool = False
    formats: tuple[str, ...] = ("nifti",)

    def __post_init__(self) -> None:
        if not self.formats:
            raise ConfigError("no output format requested")
        for name in self.formats:
            OUTPUT_FORMATS.get(name)  # unknown -> ConfigError listing the formats
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"output formats repeated: {', '.join(self.formats)}")
        if self.probabilities is not None and "nifti" not in self.formats:
            raise ConfigError("probability maps are written as NIfTI: add the nifti output format")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown NIfTI layout {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if self.probabilities is not None and self.probabilities not in PROBABILITY_DTYPES:
            raise ConfigError(
                f"unknown probability type {self.probabilities!r}; choose one of: {', '.join(PROBABILITY_DTYPES)}"
            )


def output_files(case: str, structures: Sequence[str], output: OutputConfig) -> list[Path]:
    """Every file written for one case (``labels.json`` excepted)."""
    return [path for name in output.formats for path in get_format(name).files(case, structures, output)]


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
    nifti_labelmap = "nifti" in output.formats and output.format == "labelmap"
    if nifti_labelmap and labels.exists() and _read_json(labels) != labels_mapping(structures):
        raise ConfigError(f"{labels}: already exists with other label names; pass --overwrite to replace it")


def write_prediction(
    prediction: Prediction,
    case: str,
    output: OutputConfig,
    *,
    series: DicomSeries | None = None,
    provenance: Provenance | None = None,
) -> list[Path]:
    """Write one case's prediction in every requested format.

    Args:
        prediction: The prediction (on the input grid).
        case: Case name.
        output: Formats, layout and folder.
        series: The source DICOM series (formats that reference it need it).
        provenance: What produced the prediction (written by the DICOM formats; default: unknown).

    Returns:
        The files written (``labels.json`` included for label maps).

    Raises:
        ConfigError: Probabilities were requested but the prediction does not hold them, or a DICOM
            format lacks its source series.
        GeometryError: A DICOM format's prediction is not on its series' grid.
    """
    provenance = provenance or Provenance(model="unknown", model_fingerprint="unknown")
    written: list[Path] = []
    for name in output.formats:
        written += get_format(name).write(prediction, case, output, series=series, provenance=provenance)
    return written


def source_series(items: Sequence[PredictInput], output: OutputConfig) -> dict[str, DicomSeries]:
    """Read and check the DICOM series of every input, when an output format references its source.

    Raises:
        DataError: An input is not a DICOM series folder (a NIfTI file has no series to reference), or
            its series is mixed, incomplete, irregular or lacks identifiers.
    """
    needing = [name for name in output.formats if get_format(name).needs_series]
    if not needing:
        return {}
    series = {}
    for item in items:
        if not item.path.is_dir():
            raise DataError(
                f"{item.path}: --output-format {needing[0]} needs a DICOM series input: an image file "
                "has no source series to reference"
            )
        series[item.name] = read_series(item.path)
    return series


def predict_files(
    model: nn.Module,
    inputs: Sequence[str | os.PathLike[str] | PredictInput],
    output: OutputConfig,
    *,
    config: PredictConfig | None = None,
    on_case: CaseProgress | None = None,
    progress: WindowProgress | None = None,
    provenance: Provenance | None = None,
    refine: CaseRefineHook | None = None,
    features: FeatureStore | None = None,
) -> list[Path]:
    """Predict files, folders, DICOM series or manifest cases and write the results.

    Existing outputs are refused (unless ``output.overwrite``) before any image is read, and so are
    inputs a DICOM output format cannot reference (see :func:`source_series`). Each case is written
    as soon as it is predicted; a failing case stops the run (earlier cases stay written, and the
    error names them).

    Args:
        model: A :class:`~fseft.models.FoundationModel` or :class:`~fseft.adapt.AdaptedModel`.
        inputs: Paths (expanded by :func:`~fseft.inference.inputs.find_inputs`) or prepared inputs.
        output: Output folder and layout.
        config: Inference options (``probabilities`` is set from ``output``).
        on_case: Called before each input with ``(index, count, input)``.
        progress: Window progress within the current input (see :func:`predict_image`).
        provenance: What the DICOM outputs say produced them (default: ``model``'s, unnamed).
        refine: Called with each case's name and preprocessed image before it is predicted (e.g.
            :meth:`fseft.adapt.transductive.PerQueryRefiner.refine`).
        features: Frozen backbone windows to reuse (the refinement's, for a black-box adapter).

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
    series = source_series(items, output)
    if provenance is None and series:
        provenance = Provenance.of(model)  # the model's fingerprint costs a pass over its weights
    config = replace(config or PredictConfig(), probabilities=output.probabilities is not None)
    written: list[Path] = []
    for index, item in enumerate(items):
        try:
            if on_case is not None:
                on_case(index, len(items), item)
            hook = None if refine is None else functools.partial(refine, item.name)
            prediction = predict_image(model, read_image(item.path), config=config, progress=progress, refine=hook,
                                       features=features)  # fmt: skip
        except FseftError as e:
            if index == 0:
                raise
            done = ", ".join(i.name for i in items[:index])
            raise type(e)(f"{e} (case {index + 1} of {len(items)}; already written: {done})") from e
        written += write_prediction(
            prediction, item.name, output, series=series.get(item.name), provenance=provenance
        )
    return written


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
