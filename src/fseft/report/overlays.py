"""Finding the cases to draw: predictions paired with their CT and reference by case name."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.cases import LabelSource
from ..data.io import image_suffix
from ..errors import ConfigError, DataError

_MANIFEST_FILES = ("dataset.json", "cases.csv")


@dataclass(frozen=True)
class OverlayCase:
    """A case to draw: its CT, its prediction and (optionally) its reference.

    Args:
        case: Case name (matches the ``case`` column of the evaluation).
        image: CT file or DICOM folder.
        pred: Predicted label map (on the CT grid, or covering the same space).
        pred_labels: Label value -> structure name of the prediction (its ``labels.json``).
        gt: Reference: a label-map file (named by ``gt_labels``) or a :class:`LabelSource` (template).
        gt_labels: Label value -> structure name of a label-map ``gt``.
    """

    case: str
    image: Path
    pred: Path
    pred_labels: Mapping[int, str]
    gt: Path | LabelSource | None = None
    gt_labels: Mapping[int, str] | None = None


def find_overlay_cases(
    pred: str | os.PathLike[str],
    gt: str | os.PathLike[str] | None = None,
    *,
    images: str | os.PathLike[str] | None = None,
    gt_template: str | None = None,
    cases: Sequence[str] | None = None,
) -> list[OverlayCase]:
    """Pair prediction label maps with their CT and reference.

    Args:
        pred: Folder of ``<case>.nii.gz`` predictions with their ``labels.json`` (or one such file).
        gt: A dataset manifest (gives CTs and labels), or a folder of reference label maps named by
            case (names from its ``labels.json`` or ``gt_template``); ``None``: no reference.
        images: Folder of CTs named by case, needed unless ``gt`` is a manifest.
        gt_template: Dataset template naming the values of reference label maps without ``labels.json``.
        cases: Case names to keep, in this order (default: every prediction, sorted).

    Returns:
        One :class:`OverlayCase` per prediction that has a CT.

    Raises:
        ConfigError: Label names or the CT folder are missing.
        DataError: A path is missing or a manifest is invalid.
    """
    from ..anatomy import get_template
    from ..data.manifests import load_manifest
    from ..evaluation.files import LABELS_JSON, label_files, read_labels_json

    pred = Path(pred)
    if not pred.exists():
        raise DataError(f"{pred}: predictions not found")
    folder = pred if pred.is_dir() else pred.parent
    pred_files = label_files(pred) if pred.is_dir() else {_stem(pred): pred}
    pred_labels = read_labels_json(folder / LABELS_JSON)
    wanted = list(cases) if cases is not None else sorted(pred_files)
    if gt is not None and _is_manifest(Path(gt)):
        manifest = {c.case_id: c for c in load_manifest(gt)}
        return [
            OverlayCase(
                name,
                Path(manifest[name].image),
                pred_files[name],
                pred_labels,
                manifest[name].labels[0] if manifest[name].labels else None,
            )  # fmt: skip
            for name in wanted
            if name in pred_files and name in manifest
        ]
    if images is None:
        raise ConfigError("give the CT images (--images) to draw cases, or a manifest as the reference")
    ct_files = label_files(Path(images)) if Path(images).is_dir() else {_stem(Path(images)): Path(images)}
    gt_files: dict[str, Path] = {}
    gt_labels: dict[int, str] | None = None
    if gt is not None:
        gt = Path(gt)
        if not gt.exists():
            raise DataError(f"{gt}: references not found")
        gt_files = label_files(gt) if gt.is_dir() else {_stem(gt): gt}
        labels_file = (gt if gt.is_dir() else gt.parent) / LABELS_JSON
        if labels_file.is_file():
            gt_labels = read_labels_json(labels_file)
        elif gt_template is not None:
            gt_labels = dict(get_template(gt_template).labels)
        else:
            raise ConfigError(
                f"{gt}: no {LABELS_JSON}; give the template naming its label values (--gt-template)"
            )
    return [
        OverlayCase(
            name,
            ct_files[name],
            pred_files[name],
            pred_labels,
            gt_files.get(name),
            gt_labels if name in gt_files else None,
        )  # fmt: skip
        for name in wanted
        if name in pred_files and name in ct_files
    ]


def _stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _is_manifest(path: Path) -> bool:
    if path.is_file():
        return image_suffix(path) is None
    return path.is_dir() and (
        any((path / n).is_file() for n in _MANIFEST_FILES)
        or any(p.is_dir() and (p / "ct.nii.gz").is_file() for p in path.iterdir())
    )
