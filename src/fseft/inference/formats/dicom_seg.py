"""``dicom-seg``: a DICOM Segmentation (highdicom) referencing the source series, for PACS and viewers.

One binary segment per structure (segment ``i + 1`` = structure ``i``, empty ones included, so a
reader sees what was looked for), coded with SNOMED CT where the anatomy registry knows the structure
(:mod:`.coding`). Frames lie on the source slices and reference them (SOP instances, series, frame of
reference); frames without any segment are left out. The model, the adapter and their fingerprints
are in the series description, the content description and each segment's algorithm parameters.
Written to ``<out>/dicom-seg/<case>.dcm``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ... import __version__
from ...data.dicom_series import DicomSeries
from ...errors import ConfigError
from ...io_utils import atomic_path
from .base import OutputFormat, Provenance, check_on_series, register_format
from .coding import structure_code

if TYPE_CHECKING:
    from ..predictor import Prediction
    from ..writer import OutputConfig

FOLDER = "dicom-seg"
SERIES_NUMBER = 901
#: Patient and study attributes of type 2 (present, possibly empty) that highdicom copies from the source.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


@register_format
class DicomSeg(OutputFormat):
    """DICOM Segmentation of the source series (one coded segment per structure)."""

    name = "dicom-seg"
    description = f"{FOLDER}/<case>.dcm: DICOM-SEG referencing the source series (DICOM inputs only)"
    needs_series = True

    def files(self, case: str, structures: Sequence[str], output: OutputConfig) -> list[Path]:
        return [output.out / FOLDER / f"{case}.dcm"]

    def write(
        self,
        prediction: Prediction,
        case: str,
        output: OutputConfig,
        *,
        series: DicomSeries | None,
        provenance: Provenance,
    ) -> list[Path]:
        """Write the segmentation.

        Raises:
            ConfigError: Without a source series.
            GeometryError: The prediction is not on the series' grid.
        """
        if series is None:
            raise ConfigError(f"{case}: a DICOM-SEG needs the source DICOM series")
        check_on_series(prediction, series, case)
        segmentation = build_segmentation(prediction, series, provenance)
        path = self.files(case, prediction.structures, output)[0]
        with atomic_path(path) as tmp:
            segmentation.save_as(tmp)
        return [path]


def build_segmentation(
    prediction: Prediction, series: DicomSeries, provenance: Provenance
) -> hd.seg.Segmentation:
    """The highdicom Segmentation of a prediction lying on ``series``' grid."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fseft",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters=provenance.parameters,
    )
    segments = []
    for number, name in enumerate(prediction.structures, start=1):
        code = structure_code(name)
        segment = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=code.label[:64],
            segmented_property_category=code.category,
            segmented_property_type=code.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=code.label[:64],
        )
        if code.modifier is not None:
            segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(code.modifier)
            ]
        segments.append(segment)
    frames = np.ascontiguousarray(prediction.label.array.transpose(2, 1, 0))  # [slice, row, column]
    return hd.seg.Segmentation(
        source_images=[_with_type2(ds) for ds in series.datasets],
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fseft",
        manufacturer_model_name=provenance.model[:64],
        software_versions=__version__,
        device_serial_number=provenance.model_fingerprint,
        series_description=provenance.label,
        content_description=provenance.label,
        content_label="FSEFT",
        omit_empty_frames=bool(prediction.label.array.any()),  # a SEG holds at least one frame
    )


def _with_type2(source: Dataset) -> Dataset:
    """A copy of a slice header where absent type 2 patient / study attributes are present and empty."""
    ds = copy.deepcopy(source)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds
