"""Output formats of ``fseft predict``: one module per format, each registered in :data:`OUTPUT_FORMATS`.

Adding a format is one file: an :class:`OutputFormat` subclass decorated with :func:`register_format`
that lists the files it writes and writes them; import it below.
"""

from . import dicom_seg, nifti, rtstruct  # noqa: F401  (each import registers its format)
from .base import OUTPUT_FORMATS, OutputFormat, Provenance, file_fingerprint, get_format, register_format
from .nifti import LABELS_JSON, labels_mapping

__all__ = [
    "LABELS_JSON",
    "OUTPUT_FORMATS",
    "OutputFormat",
    "Provenance",
    "file_fingerprint",
    "get_format",
    "labels_mapping",
    "register_format",
]
