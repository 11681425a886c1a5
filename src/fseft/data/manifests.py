"""Dataset manifests: every supported layout parsed into a list of :class:`~fseft.data.cases.Case`.

Formats (``load_manifest`` tells them apart):

* CSV: columns ``image`` (required), ``label`` (optional; ``;``-separated for several sources),
  ``case`` / ``case_id``, ``dataset``, ``site``, ``template`` (one name, or one per label),
  ``structures`` (``;``-separated), ``split``; other columns go to ``Case.meta``. Paths are relative
  to the CSV's folder. :func:`write_manifest_csv` writes this format.
* MSD / nnU-Net v2 ``dataset.json`` (labelled training cases).
* A TotalSegmentator tree: subject folders with ``ct.nii.gz`` and ``segmentations/*.nii.gz``,
  optionally ``meta.csv`` (with a ``split`` column).
* OpenKBP ``cases.csv``: case, split, image, label, ptv, spacing_mm, structures.

Loading checks that files exist but never opens an image, so it stays fast on large datasets.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..anatomy import DatasetTemplate, canonical, get_template, register_template
from ..errors import ConfigError, DataError
from ..io_utils import atomic_path
from .cases import Case, LabelSource
from .io import image_suffix

logger = logging.getLogger(__name__)

TOTALSEG_TEMPLATE = "totalsegmentator"
OPENKBP_TEMPLATE = "openkbp"
OPENKBP_PTV_TEMPLATE = "openkbp-ptv"
_OPENKBP_COLUMNS = {"case", "split", "image", "label", "ptv", "structures"}
_CSV_COLUMNS = ("case_id", "image", "label", "template", "dataset", "site", "structures", "split")


def load_manifest(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    template: str | None = None,
    require_files: bool = True,
) -> list[Case]:
    """Parse a manifest into cases, checking that every referenced file exists.

    Args:
        path: A CSV (generic or OpenKBP ``cases.csv``), a ``dataset.json``, or a folder holding one of
            them or a TotalSegmentator tree.
        root: Folder that relative paths in a CSV or ``dataset.json`` start from (default: the
            manifest's folder). A TotalSegmentator tree is always read from its own folder.
        template: Template for label files when the manifest does not name one (CSV without a
            ``template`` column, ``dataset.json``; without it a ``dataset.json`` gets an inline
            template built from its ``labels``).
        require_files: Refuse a missing image or label file; ``False`` lets them through (``fseft
            check-data`` reports every missing file instead of stopping at the first).

    Returns:
        The cases in manifest order.

    Raises:
        DataError: Unknown layout, missing column or file, duplicate case id, unknown structure name;
            the message names the manifest and the row.
        ConfigError: ``template`` is not a known template.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    if template is not None:
        get_template(template)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            path = path / "dataset.json"
        elif (path / "cases.csv").is_file():
            path = path / "cases.csv"
        else:
            return _load_totalsegmentator(path)
    base = Path(root) if root is not None else path.parent
    if path.suffix.lower() == ".json":
        cases = _load_dataset_json(path, base, template, require_files)
    elif path.suffix.lower() == ".csv":
        cases = _load_csv(path, base, template, require_files)
    else:
        raise DataError(f"{path}: unknown manifest format (expected .csv, dataset.json or a folder)")
    _check_unique(cases, path)
    logger.info("%s: %d cases", path, len(cases))
    return cases


def write_manifest_csv(cases: Iterable[Case], path: str | os.PathLike[str]) -> None:
    """Write cases as a CSV manifest (atomically) that :func:`load_manifest` reads back unchanged.

    Paths are written relative to the CSV's folder.

    Args:
        cases: The cases to write.
        path: Output ``.csv`` file.
    """
    path = Path(path)
    cases = list(cases)
    meta_keys = sorted({key for case in cases for key in case.meta} - set(_CSV_COLUMNS))
    folder = path.parent.resolve()

    def rel(p: Path) -> str:
        return os.path.relpath(_absolute(p), folder)

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*_CSV_COLUMNS, *meta_keys])
        for case in cases:
            templates = [source.template for source in case.labels]
            writer.writerow(
                [
                    case.case_id,
                    rel(case.image),
                    ";".join(rel(source.path) for source in case.labels),
                    templates[0] if len(set(templates)) == 1 else ";".join(templates),
                    case.dataset,
                    case.site or "",
                    "" if case.structures is None else ";".join(case.structures),
                    case.split or "",
                    *(case.meta.get(key, "") for key in meta_keys),
                ]
            )


def _absolute(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _check_unique(cases: Sequence[Case], manifest: Path) -> None:
    seen: dict[str, int] = {}
    for index, case in enumerate(cases, start=1):
        if case.case_id in seen:
            raise DataError(
                f"{manifest}: case {index}: duplicate case id {case.case_id!r} (also case {seen[case.case_id]})"
            )
        seen[case.case_id] = index


def _existing(path: Path, where: str, required: bool) -> Path:
    if required and not path.exists():
        raise DataError(f"{where}: file not found: {path}")
    return path


def _canonical_list(value: str, where: str) -> tuple[str, ...] | None:
    names = [v.strip() for v in value.split(";") if v.strip()]
    if not names:
        return None
    try:
        return tuple(canonical(name) for name in names)
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from e


def _default_case_id(image: Path) -> str:
    suffix = image_suffix(image)
    return image.name[: -len(suffix)] if suffix else image.name


# --- CSV (generic and OpenKBP) ---------------------------------------------------------------------


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Lower-cased column names and ``(line number, row)`` pairs; ``;`` or ``,`` separated."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter=";" if header.count(";") > header.count(",") else ",")
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty manifest")
            columns = [name.strip().lower() for name in reader.fieldnames]
            reader.fieldnames = columns
            rows = [
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None})
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from e
    return columns, rows


def _load_csv(path: Path, base: Path, default_template: str | None, required: bool) -> list[Case]:
    columns, rows = _read_csv_rows(path)
    if _OPENKBP_COLUMNS <= set(columns):
        return _load_openkbp(path, base, rows, required)
    if "image" not in columns:
        raise DataError(f"{path}: missing column 'image' (columns: {', '.join(columns)})")
    known = {"case", *(_CSV_COLUMNS)}
    cases = []
    for line, row in rows:
        where = f"{path}: line {line}"
        if not row.get("image"):
            raise DataError(f"{where}: empty 'image'")
        image = _existing(_absolute(base / row["image"]), where, required)
        label_paths = [p.strip() for p in row.get("label", "").split(";") if p.strip()]
        templates = [t.strip() for t in row.get("template", "").split(";") if t.strip()]
        if label_paths and not templates:
            if default_template is None:
                raise DataError(
                    f"{where}: a label needs a template (add a 'template' column or pass --template)"
                )
            templates = [default_template]
        if len(templates) == 1:
            templates = templates * len(label_paths)
        if label_paths and len(templates) != len(label_paths):
            raise DataError(f"{where}: {len(label_paths)} labels but {len(templates)} templates")
        for name in set(templates):
            try:
                get_template(name)
            except ConfigError as e:
                raise DataError(f"{where}: {e}") from e
        labels = tuple(
            LabelSource(_existing(_absolute(base / p), where, required), t)
            for p, t in zip(label_paths, templates, strict=True)
        )
        cases.append(
            Case(
                case_id=row.get("case_id") or row.get("case") or _default_case_id(image),
                image=image,
                labels=labels,
                dataset=row.get("dataset") or "default",
                site=row.get("site") or None,
                structures=_canonical_list(row.get("structures", ""), where),
                split=row.get("split") or None,
                meta={k: v for k, v in row.items() if k not in known},
            )
        )
    return cases


def _load_openkbp(
    path: Path, base: Path, rows: list[tuple[int, dict[str, str]]], required: bool
) -> list[Case]:
    ptv_structures = get_template(OPENKBP_PTV_TEMPLATE).structures
    cases = []
    for line, row in rows:
        where = f"{path}: line {line}"
        if not row["case"] or not row["image"]:
            raise DataError(f"{where}: empty 'case' or 'image'")
        labels = []
        structures: list[str] = []
        if row["label"]:
            labels.append(LabelSource(_existing(_absolute(base / row["label"]), where, required), OPENKBP_TEMPLATE))
            structures.extend(_canonical_list(row["structures"], where) or ())
        if row["ptv"]:
            labels.append(LabelSource(_existing(_absolute(base / row["ptv"]), where, required), OPENKBP_PTV_TEMPLATE))
            structures.extend(ptv_structures)
        cases.append(
            Case(
                case_id=row["case"],
                image=_existing(_absolute(base / row["image"]), where, required),
                labels=tuple(labels),
                dataset="openkbp",
                structures=tuple(structures),
                split=row["split"] or None,
                meta={k: v for k, v in row.items() if k not in _OPENKBP_COLUMNS},
            )
        )
    return cases


# --- MSD / nnU-Net dataset.json --------------------------------------------------------------------


def _load_dataset_json(path: Path, base: Path, template: str | None, required: bool) -> list[Case]:
    try:
        spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable dataset.json ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("labels"), dict):
        raise DataError(f"{path}: dataset.json needs a 'labels' mapping")
    dataset = str(spec.get("name") or path.parent.name)
    values = _json_label_values(spec["labels"], path)
    template_name = template or _inline_template(f"{dataset}-inline", values, path)
    if "training" in spec:
        pairs = _msd_pairs(spec["training"], base, path, required)
    elif "file_ending" in spec:
        pairs = _nnunet_pairs(spec, base, path, required)
    else:
        raise DataError(f"{path}: neither an MSD ('training') nor an nnU-Net v2 ('file_ending') dataset.json")
    return [
        Case(case_id=case_id, image=image, labels=(LabelSource(label, template_name),), dataset=dataset)
        for case_id, image, label in pairs
    ]


def _json_label_values(labels: dict[str, Any], path: Path) -> dict[int, str]:
    """MSD ``{"1": "liver"}`` or nnU-Net v2 ``{"liver": 1}`` -> ``{1: "liver"}`` (background dropped)."""
    values: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, str) and str(key).isdigit():  # MSD
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2
            number, name = value, str(key)
        else:
            raise DataError(
                f"{path}: label entry {key!r}: {value!r} is not 'value: name' or 'name: value'"
                " (region-based labels are not supported)"
            )
        if number != 0:
            values[number] = name
    if not values:
        raise DataError(f"{path}: 'labels' has no foreground label")
    return values


def _inline_template(name: str, values: dict[int, str], path: Path) -> str:
    """Register (once per process) a template built from a dataset.json's labels; returns its name."""
    try:
        template = DatasetTemplate(
            name=name, labels=values, description=f"inline template from {path}", path=path.resolve()
        )
        return register_template(template).name
    except ConfigError as e:
        raise DataError(f"{e}; pass --template NAME to use a declared template") from e


def _msd_pairs(entries: Any, base: Path, path: Path, required: bool) -> list[tuple[str, Path, Path]]:
    if not isinstance(entries, list):
        raise DataError(f"{path}: 'training' must be a list of {{'image', 'label'}}")
    pairs = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: training[{number - 1}]"
        if not isinstance(entry, dict) or not entry.get("image") or not entry.get("label"):
            raise DataError(f"{where}: needs 'image' and 'label'")
        image = _existing(_absolute(base / entry["image"]), where, required)
        label = _existing(_absolute(base / entry["label"]), where, required)
        pairs.append((_default_case_id(image), image, label))
    return pairs


def _nnunet_pairs(
    spec: dict[str, Any], base: Path, path: Path, required: bool
) -> list[tuple[str, Path, Path]]:
    channels = {str(k): str(v) for k, v in (spec.get("channel_names") or {"0": "CT"}).items()}
    if len(channels) == 1:
        channel = next(iter(channels))
    else:
        ct = [k for k, v in channels.items() if v.lower() == "ct"]
        if len(ct) != 1:
            raise DataError(f"{path}: {len(channels)} channels {channels} and not exactly one named 'CT'")
        channel = ct[0]
    ending = str(spec["file_ending"])
    suffix = f"_{int(channel):04d}{ending}"
    images = sorted((base / "imagesTr").glob(f"*{suffix}"))
    if not images:
        raise DataError(f"{path}: no training images '*{suffix}' in {base / 'imagesTr'}")
    pairs = []
    for image in images:
        case_id = image.name[: -len(suffix)]
        label = _existing(_absolute(base / "labelsTr" / f"{case_id}{ending}"), f"{path}: case {case_id!r}", required)
        pairs.append((case_id, _absolute(image), label))
    expected = spec.get("numTraining")
    if isinstance(expected, int) and expected != len(pairs):
        logger.warning("%s: numTraining is %d but %d training cases were found", path, expected, len(pairs))
    return pairs


# --- TotalSegmentator tree -------------------------------------------------------------------------


def _load_totalsegmentator(folder: Path) -> list[Case]:
    subjects = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file())
    if not subjects:
        raise DataError(
            f"{folder}: no dataset.json, cases.csv or TotalSegmentator subject folders (with ct.nii.gz)"
        )
    meta: dict[str, dict[str, str]] = {}
    if (folder / "meta.csv").is_file():
        columns, rows = _read_csv_rows(folder / "meta.csv")
        if "image_id" not in columns:
            raise DataError(f"{folder / 'meta.csv'}: missing column 'image_id'")
        meta = {row["image_id"]: row for _, row in rows}
    cases = []
    for subject in subjects:
        info = meta.get(subject.name, {})
        segmentations = subject / "segmentations"
        labels = (LabelSource(segmentations, TOTALSEG_TEMPLATE),) if segmentations.is_dir() else ()
        cases.append(
            Case(
                case_id=subject.name,
                image=_absolute(subject / "ct.nii.gz"),
                labels=tuple(LabelSource(_absolute(s.path), s.template) for s in labels),
                dataset="totalsegmentator",
                site=info.get("institute") or None,
                split=info.get("split") or None,
                meta={k: v for k, v in info.items() if k not in {"image_id", "institute", "split"}},
            )
        )
    logger.info("%s: %d TotalSegmentator subjects", folder, len(cases))
    return cases
