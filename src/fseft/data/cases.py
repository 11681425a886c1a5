"""The one typed in-memory description of a labelled (or unlabelled) case.

Every manifest format (CSV, MSD/nnU-Net ``dataset.json``, TotalSegmentator tree, OpenKBP
``cases.csv``) is parsed into a list of :class:`Case`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LabelSource:
    """One label file (or folder of per-structure masks) and the template that names its values.

    Args:
        path: A label-map file, or a folder with one binary mask file per structure.
        template: Name of the dataset template (``fseft.anatomy``) mapping values/files to structures.
    """

    path: Path
    template: str


@dataclass(frozen=True)
class Case:
    """A CT volume with its label sources and partial-annotation metadata.

    Args:
        case_id: Unique identifier within its dataset.
        image: Image file or DICOM series folder.
        labels: Label sources, in priority order (a later source never overwrites an earlier one).
        dataset: Dataset name (used for dataset-balanced sampling and reports).
        site: Acquisition site / scanner group, if known.
        structures: Canonical names of the structures annotated in this case; ``None`` means every
            structure of its templates. Structures outside this set are *unknown*, never background.
        split: Split name from the source (``train-pats``, ``validation``...), if any.
    """

    case_id: str
    image: Path
    labels: tuple[LabelSource, ...] = ()
    dataset: str = "default"
    site: str | None = None
    structures: tuple[str, ...] | None = None
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_label(self) -> bool:
        return bool(self.labels)
