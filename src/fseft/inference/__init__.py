"""Inference: sliding-window prediction mapped back to the input's own grid, and writing it.

Public API: :func:`predict_image` (one in-memory image -> :class:`Prediction`), :func:`predict_files`
(files, folders, DICOM series, manifests -> NIfTI, DICOM-SEG, RT Structure Set files),
:class:`PredictConfig`, :class:`OutputConfig`, :func:`find_inputs`, the output formats (:data:`OUTPUT_FORMATS`).
"""

from .formats import OUTPUT_FORMATS, OutputFormat, Provenance
from .inputs import PredictInput, find_inputs
from .predictor import PredictConfig, Prediction, RefineHook, describe_model, predict_image
from .writer import FORMATS, LABELS_JSON, PROBABILITY_DTYPES, OutputConfig, predict_files, write_prediction

__all__ = [
    "FORMATS",
    "LABELS_JSON",
    "OUTPUT_FORMATS",
    "PROBABILITY_DTYPES",
    "OutputConfig",
    "OutputFormat",
    "PredictConfig",
    "PredictInput",
    "Prediction",
    "Provenance",
    "RefineHook",
    "describe_model",
    "find_inputs",
    "predict_files",
    "predict_image",
    "write_prediction",
]
