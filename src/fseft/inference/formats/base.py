"""What every output format shares: the provenance written into files, the interface and the registry.

A format (``fseft predict --output-format NAME``) is a small class: the files it writes for a case
(:meth:`OutputFormat.files`, so existing outputs are refused before anything runs) and how it writes
them (:meth:`OutputFormat.write`, atomically). Formats that reference their source (DICOM) say so with
``needs_series``: their inputs must be DICOM series folders, read and checked before any prediction.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from torch import nn

from ... import __version__
from ...data.dicom_series import DicomSeries
from ...errors import GeometryError
from ...registry import Registry
from ..predictor import Prediction, describe_model

if TYPE_CHECKING:
    from ..writer import OutputConfig

#: Largest difference (mm) between the prediction's affine and its source series' geometry.
GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Provenance:
    """What produced a prediction, written into the outputs' description fields.

    Args:
        model: Model name or file.
        model_fingerprint: :meth:`~fseft.models.FoundationModel.fingerprint` of the (base) model.
        adapter: Adapter file name, when one was applied.
        adapter_fingerprint: First 16 hex digits of the adapter file's sha256.
    """

    model: str
    model_fingerprint: str
    adapter: str | None = None
    adapter_fingerprint: str | None = None

    @classmethod
    def of(
        cls, model: nn.Module, name: str | None = None, adapter: str | os.PathLike[str] | None = None
    ) -> Provenance:
        """The provenance of ``model`` (a foundation or adapted model) loaded as ``name`` with ``adapter``."""
        base = describe_model(model)[3]
        path = Path(adapter) if adapter is not None else None
        return cls(
            model=name or base.config.arch,
            model_fingerprint=base.fingerprint(),
            adapter=path.name if path is not None else None,
            adapter_fingerprint=file_fingerprint(path) if path is not None else None,
        )

    @property
    def parameters(self) -> dict[str, str]:
        """Name -> value, for DICOM algorithm parameters."""
        out = {"model": self.model, "model_fingerprint": self.model_fingerprint}
        if self.adapter is not None:
            out |= {"adapter": self.adapter, "adapter_sha256": self.adapter_fingerprint or ""}
        return out

    @property
    def text(self) -> str:
        """One sentence naming fseft, the model and the adapter with their fingerprints."""
        adapter = f", adapter {self.adapter} (sha256 {self.adapter_fingerprint})" if self.adapter else ""
        return f"fseft {__version__}: model {self.model} (fingerprint {self.model_fingerprint}){adapter}"

    @property
    def label(self) -> str:
        """A short description (at most 64 characters, a DICOM LO): model and adapter names."""
        text = f"fseft {self.model}" + (f" + {self.adapter}" if self.adapter else "")
        return text if len(text) <= 64 else text[:61] + "..."


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of a file's sha256 (compare with ``sha256sum FILE``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class OutputFormat(abc.ABC):
    """Base class of output formats; subclasses set the class attributes and implement both methods.

    Class attributes:
        name: Registry name (``fseft predict --output-format NAME``).
        description: One line for ``--help``.
        needs_series: The format references a source DICOM series (inputs must be DICOM folders).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_series: ClassVar[bool] = False

    @abc.abstractmethod
    def files(self, case: str, structures: Sequence[str], output: OutputConfig) -> list[Path]:
        """Every file :meth:`write` writes for one case."""

    @abc.abstractmethod
    def write(
        self,
        prediction: Prediction,
        case: str,
        output: OutputConfig,
        *,
        series: DicomSeries | None,
        provenance: Provenance,
    ) -> list[Path]:
        """Write one case's prediction (atomically); returns the files written."""


OUTPUT_FORMATS: Registry[type[OutputFormat]] = Registry("output format")


def register_format(cls: type[OutputFormat]) -> type[OutputFormat]:
    """Class decorator adding an :class:`OutputFormat` to :data:`OUTPUT_FORMATS` under its ``name``."""
    return OUTPUT_FORMATS.add(cls.name, cls)


def get_format(name: str) -> OutputFormat:
    """An instance of the format registered as ``name`` (unknown -> ConfigError listing the formats)."""
    return OUTPUT_FORMATS.get(name)()


def check_on_series(prediction: Prediction, series: DicomSeries, case: str) -> None:
    """Refuse to write a prediction whose grid is not its source series' grid.

    Raises:
        GeometryError: Naming the case, when shape or affine differ.
    """
    label = prediction.label
    if label.shape != series.shape or not np.allclose(label.affine, series.affine, atol=GRID_TOLERANCE_MM):
        raise GeometryError(
            f"{case}: the prediction's grid {label.shape} is not the grid of the DICOM series {series.folder}"
        )
