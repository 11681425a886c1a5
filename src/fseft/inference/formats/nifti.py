"""``nifti``: label maps or per-structure masks, optionally probability maps, on the input's grid.

Layout inside the output folder::

    <case>.nii.gz                       label map (layout "labelmap"): 0 background, i + 1 = structure i
    labels.json                         {"1": "liver", ...}: the names 'fseft evaluate' reads
    <case>/<structure>.nii.gz           one binary mask per structure (layout "masks", TotalSegmentator-style)
    <case>_probabilities/<structure>.nii.gz   probability maps (optional): uint8 scaled by 1/255 in the
                                        NIfTI header (readers get floats in [0, 1]) or float32

Masks are the label map split per structure, so they never overlap. NIfTI has no float16 type,
hence the uint8 encoding (resolution 1/255) as the compact choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from ...data.dicom_series import DicomSeries
from ...data.image import Image
from ...data.io import write_image
from ...errors import ConfigError
from ...io_utils import atomic_path, write_json_atomic
from .base import OutputFormat, Provenance, register_format

if TYPE_CHECKING:
    from ..predictor import Prediction
    from ..writer import OutputConfig

#: Label names beside label maps (the file ``fseft evaluate`` reads).
LABELS_JSON = "labels.json"


def labels_mapping(structures: Sequence[str]) -> dict[str, str]:
    """The ``labels.json`` content: ``{"1": structures[0], ...}``."""
    return {str(i + 1): name for i, name in enumerate(structures)}


@register_format
class Nifti(OutputFormat):
    """NIfTI label map (or masks) in the input's grid and affine, with ``labels.json``."""

    name = "nifti"
    description = "<case>.nii.gz + labels.json (or masks with --format masks)"

    def files(self, case: str, structures: Sequence[str], output: OutputConfig) -> list[Path]:
        if output.format == "labelmap":
            files = [output.out / f"{case}.nii.gz"]
        else:
            files = [output.out / case / f"{name}.nii.gz" for name in structures]
        if output.probabilities is not None:
            files += [output.out / f"{case}_probabilities" / f"{name}.nii.gz" for name in structures]
        return files

    def write(
        self,
        prediction: Prediction,
        case: str,
        output: OutputConfig,
        *,
        series: DicomSeries | None,
        provenance: Provenance,
    ) -> list[Path]:
        """Write the label map (or masks) and probability maps; ``labels.json`` is included.

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
