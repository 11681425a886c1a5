"""``rtstruct``: an RT Structure Set on the source series, for treatment planning systems.

One ROI per structure (empty ones without contours, so a reader sees what was looked for). On each
source slice where a structure has voxels, its closed planar contours
(:func:`fseft.data.contours.mask_polygons`: halfway between inside and outside pixel centres, holes
as nested contours, read with the even-odd rule) in patient coordinates of that very slice, each
referencing the slice's SOP instance. ROIs carry their SNOMED CT identification code and laterality
where the anatomy registry knows them (:mod:`.coding`). The structure set description names the
model, the adapter and their fingerprints. Written to ``<out>/rtstruct/<case>.dcm``.

The dataset is assembled with pydicom from the RT Structure Set IOD's modules (patient, study, RT
series, frame of reference, equipment, structure set, ROI contour, RT ROI observations, SOP common):
highdicom, which writes the DICOM-SEG, has no RT Structure Set, and the RT-specific libraries
(rt-utils) are unmaintained and mishandle non-square pixels and mixed folders.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from ... import __version__
from ...data.contours import mask_polygons
from ...data.dicom_series import DicomSeries
from ...errors import ConfigError
from ...io_utils import atomic_path
from .base import OutputFormat, Provenance, check_on_series, register_format
from .coding import structure_code

if TYPE_CHECKING:
    from ..predictor import Prediction
    from ..writer import OutputConfig

FOLDER = "rtstruct"
SERIES_NUMBER = 902
CONTOUR_DATA = 0x30060050
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Patient and study attributes copied from the source (RT Structure Sets join the source's study).
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")  # fmt: skip


@register_format
class RtStruct(OutputFormat):
    """RT Structure Set whose contours lie on the source slices."""

    name = "rtstruct"
    description = f"{FOLDER}/<case>.dcm: RT Structure Set on the source slices (DICOM inputs only)"
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
        """Write the structure set.

        Raises:
            ConfigError: Without a source series.
            GeometryError: The prediction is not on the series' grid.
        """
        if series is None:
            raise ConfigError(f"{case}: an RT Structure Set needs the source DICOM series")
        check_on_series(prediction, series, case)
        dataset = build_rtstruct(prediction, series, provenance)
        path = self.files(case, prediction.structures, output)[0]
        with atomic_path(path) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        return [path]


def build_rtstruct(prediction: Prediction, series: DicomSeries, provenance: Provenance) -> Dataset:
    """The RT Structure Set dataset of a prediction lying on ``series``' grid."""
    source = series.datasets[0]
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = hd.UID()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in _COPIED:
        setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = hd.UID()
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = provenance.label
    ds.OperatorsName = ""
    ds.Manufacturer = "fseft"
    ds.ManufacturerModelName = provenance.model[:64]
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = "fseft"
    ds.StructureSetName = provenance.model[:64]
    ds.StructureSetDescription = provenance.text[:1024]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = [_frame_reference(series)]
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    label = prediction.label.array
    boxes = ndimage.find_objects(label, max_label=len(prediction.structures))
    palette = colormaps["tab10"]
    for value, (name, box) in enumerate(zip(prediction.structures, boxes, strict=True), start=1):
        code = structure_code(name)
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = source.FrameOfReferenceUID
        roi.ROIName = code.label[:64]
        roi.ROIDescription = provenance.label
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = provenance.label
        ds.StructureSetROISequence.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = value
        contour.ROIDisplayColor = [int(round(255 * c)) for c in palette((value - 1) % 10)[:3]]
        if box is not None:  # an empty structure stays an ROI without contours (the sequence is optional)
            contour.ContourSequence = _contours(label, value, box, series)
        ds.ROIContourSequence.append(contour)
        observation = Dataset()
        observation.ObservationNumber = value
        observation.ReferencedROINumber = value
        observation.RTROIInterpretedType = code.rt_type
        observation.ROIInterpreter = ""
        identification = hd.sr.CodedConcept.from_code(code.type)
        if code.modifier is not None:
            identification.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(code.modifier)
            ]
        observation.RTROIIdentificationCodeSequence = [identification]
        ds.RTROIObservationsSequence.append(observation)
    return ds


def _frame_reference(series: DicomSeries) -> Dataset:
    source = series.datasets[0]
    images = []
    for slice_ in series.datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = slice_.SOPClassUID
        item.ReferencedSOPInstanceUID = slice_.SOPInstanceUID
        images.append(item)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = source.SeriesInstanceUID
    referenced_series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Study Management (the RT convention)
    study.ReferencedSOPInstanceUID = source.StudyInstanceUID
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = source.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _contours(label: np.ndarray, value: int, box: tuple[slice, ...], series: DicomSeries) -> DicomSequence:
    """The closed planar contours of ``label == value`` on every slice of ``box``, in patient coordinates."""
    columns, rows = box[0].start, box[1].start
    contours = DicomSequence()
    for k in range(box[2].start, box[2].stop):
        mask = label[box[0], box[1], k].T == value  # [row, column] of the cropped slice
        if not mask.any():
            continue
        slice_ = series.datasets[k]
        origin = np.asarray(slice_.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(slice_.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in slice_.PixelSpacing)
        axes = np.stack([orientation[:3] * column_spacing, orientation[3:] * row_spacing])  # per column, row
        reference = Dataset()
        reference.ReferencedSOPClassUID = slice_.SOPClassUID
        reference.ReferencedSOPInstanceUID = slice_.SOPInstanceUID
        for polygon in mask_polygons(mask):
            points = origin + (polygon + (columns, rows)) @ axes
            item = Dataset()
            item.ContourImageSequence = [reference]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(contours) + 1
            item[CONTOUR_DATA] = _decimal_strings(points.ravel())
            contours.append(item)
    return contours


def _decimal_strings(values: np.ndarray) -> RawDataElement:
    """Contour Data as encoded DS text (0.1 um resolution), skipping pydicom's per-value checks (slow)."""
    text = "\\".join(f"{v:.4f}".rstrip("0").rstrip(".") for v in values.tolist()).encode("ascii")
    text += b" " * (len(text) % 2)  # DICOM values have even length
    return RawDataElement(Tag(CONTOUR_DATA), "DS", len(text), text, 0, False, True)
