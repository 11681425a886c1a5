"""Dataset integrity checks (``fseft check-data``), in the spirit of nnU-Net's ``verify_dataset_integrity``.

Every case is checked independently and every problem becomes one :class:`Problem` naming the file:

* errors: missing / unreadable / truncated / empty files, every problem the shared CT validation
  (:mod:`fseft.data.validate`) refuses (NaN or infinite voxels, a singular affine, a voxel spacing
  outside the plausible range), label grids that do not cover the image's space, non-integer label
  values or values the template does not define, labelled cases whose labels hold no structure,
  duplicate case ids and duplicate image contents, unknown templates;
* warnings: labels on another grid of the same space (resampled when loaded), implausible Hounsfield
  ranges, structures a case declares as annotated whose masks are empty.

Nothing a broken input does is fatal: reader exceptions of any kind become error problems.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..anatomy import DatasetTemplate, canonical, get_template
from ..errors import DataError, FseftError
from . import io as data_io
from .cases import Case, LabelSource
from .dataset import file_fingerprint
from .geometry import align_label
from .image import Image
from .validate import CTLimits, ct_problems

logger = logging.getLogger(__name__)

Severity = Literal["error", "warning"]
#: Plausible CT values (HU); outside them is a warning.
HU_LIMITS = (-3000.0, 10000.0)


@dataclass(frozen=True)
class Problem:
    """One finding about one file of one case.

    Args:
        case_id: The case (``"-"`` for manifest-level problems).
        severity: ``"error"`` (the data cannot be used as it is) or ``"warning"``.
        path: The file (or folder) concerned.
        message: What is wrong, in one line.
    """

    case_id: str
    severity: Severity
    path: str
    message: str

    def line(self) -> str:
        """``"error: case: PATH: message"``."""
        return f"{self.severity}: {self.case_id}: {self.path}: {self.message}"


@dataclass
class CheckReport:
    """The outcome of checking a set of cases.

    Args:
        cases: Number of cases checked.
        problems: Every problem found, in case order.
        source: The manifest checked, if any.
    """

    cases: int
    problems: list[Problem] = field(default_factory=list)
    source: str | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def passed(self, strict: bool = False) -> bool:
        """No errors (and, when ``strict``, no warnings either)."""
        return not self.errors and not (strict and self.warnings)

    def summary(self) -> str:
        """One line: cases checked, errors, warnings."""
        return f"{self.cases} case(s) checked: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form of the report."""
        return {
            "source": self.source,
            "cases": self.cases,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
        }


def _describe(error: BaseException, path: Path) -> str:
    """One line for an exception, without repeating the path an fseft message starts with."""
    text = " ".join(str(error).split()) or type(error).__name__
    prefix = f"{path}: "
    if isinstance(error, FseftError) and text.startswith(prefix):
        return text[len(prefix) :]
    return text if isinstance(error, FseftError) else f"{type(error).__name__}: {text}"


def _with_parts(template: DatasetTemplate, structures: set[str]) -> set[str]:
    """Add the right/left parts of the lumped structures the template splits."""
    return structures | {part for name in structures for part in template.split_rules.get(name, ())}


class _CaseChecker:
    """Collects the problems of one case."""

    def __init__(self, case: Case, template_override: str | None, limits: CTLimits) -> None:
        self.case = case
        self.template_override = template_override
        self.limits = limits
        self.problems: list[Problem] = []

    def add(self, severity: Severity, path: Path | str, message: str) -> None:
        self.problems.append(Problem(self.case.case_id, severity, str(path), message))

    def guarded(self, path: Path, action: Callable[[], Any]) -> Any:
        """Run a reader; any exception becomes an error naming ``path`` (returns ``None`` then)."""
        try:
            return action()
        except Exception as e:  # broken inputs must be reported, never crash the check
            self.add("error", getattr(e, "filename", None) or path, _describe(e, path))
            return None

    def run(self) -> list[Problem]:
        image = self.guarded(self.case.image, lambda: data_io.read_image(self.case.image))
        if image is not None:
            self.check_image(image)
        present: dict[LabelSource, set[str]] = {}
        for source in self.case.labels:
            present[source] = (
                self.guarded(Path(source.path), lambda s=source: self.check_label(s, image)) or set()
            )
        if image is not None and self.case.labels and not any(p.severity == "error" for p in self.problems):
            self.check_annotations(present)
        return self.problems

    def check_image(self, image: Image) -> None:
        path = self.case.image
        for problem in ct_problems(image, self.limits):
            self.add("error", path, problem)
        array = image.array[np.isfinite(image.array)]
        if array.size:
            low, high = float(array.min()), float(array.max())
            if high < 0 or low > -500 or low < HU_LIMITS[0] or high > HU_LIMITS[1]:
                self.add(
                    "warning",
                    path,
                    f"implausible CT intensities [{low:g}, {high:g}] (expected Hounsfield units: air near -1000, "
                    f"within [{HU_LIMITS[0]:g}, {HU_LIMITS[1]:g}])",
                )

    def template(self, source: LabelSource) -> DatasetTemplate:
        return get_template(self.template_override or source.template)

    def check_label(self, source: LabelSource, image: Image | None) -> set[str]:
        """Problems of one label source; returns the structures with at least one voxel."""
        template = self.template(source)
        path = Path(source.path)
        if template.layout == "mask-files":
            if not path.is_dir():
                raise DataError(f"{path}: template {template.name!r} expects a folder of mask files")
            files = {
                file.name[: -len(suffix)]: file
                for file in sorted(path.iterdir())
                if file.is_file() and (suffix := data_io.image_suffix(file)) is not None
            }
            masks = {
                structure: self.guarded(
                    files[stem], lambda f=files[stem]: self.read_label_file(f, image, template, True)
                )
                for stem, structure in template.mask_files.items()
                if stem in files
            }
            if not masks:
                raise DataError(f"{path}: holds none of the mask files of template {template.name!r}")
            return _with_parts(
                template, {name for name, mask in masks.items() if mask is not None and mask.any()}
            )
        if path.is_dir():
            raise DataError(f"{path}: template {template.name!r} expects a label-map file, got a folder")
        label = self.read_label_file(path, image, template, binary=False)
        if label is None:
            return set()
        values = set(np.unique(label).tolist()) - {0}
        return _with_parts(template, {template.labels[v] for v in values if v in template.labels})

    def read_label_file(
        self, path: Path, image: Image | None, template: DatasetTemplate, binary: bool
    ) -> np.ndarray | None:
        label = data_io.read_image(path, dtype=None)
        array = label.array
        if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
            self.add("error", path, "label holds non-integer, NaN or infinite values")
            return None
        if array.dtype.kind not in "fiub":
            self.add("error", path, f"label has unsupported voxel type {array.dtype}")
            return None
        values = np.unique(array).astype(np.int64)
        allowed = {0, 1} if binary else {0, *template.labels}
        unknown = sorted(set(values.tolist()) - allowed)
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:10]) + (
                f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            )
            known = (
                "0 and 1 (binary mask)" if binary else f"0 and {', '.join(str(v) for v in template.labels)}"
            )
            self.add(
                "error",
                path,
                f"label value(s) {shown} unknown to template {template.name!r} (it defines {known})",
            )
        if image is not None:
            aligned = align_label(label, image)  # GeometryError -> error problem via guarded()
            if aligned is not label:
                self.add(
                    "warning",
                    path,
                    f"label grid differs from the image grid ({label.shape} {label.axcodes} vs {image.shape} "
                    f"{image.axcodes}) but covers the same space: it will be resampled (nearest) when loaded",
                )
        return array

    def check_annotations(self, present: dict[LabelSource, set[str]]) -> None:
        """Empty labels (error) and declared structures whose masks are empty (warning)."""
        if not any(present.values()):
            self.add("error", self.case.labels[0].path, "empty label: no annotated structure has any voxel")
            return
        if self.case.structures is None:
            return
        found = set().union(*present.values())
        missing: dict[Path, list[str]] = {}
        for name in self.case.structures:
            try:
                structure = canonical(name)
            except FseftError as e:
                self.add("error", self.case.labels[0].path, f"declared structure {name!r}: {e}")
                continue
            if structure not in found:
                # name the label source meant to provide it
                source = next(
                    (s for s in present if structure in self.template(s).structures), self.case.labels[0]
                )
                missing.setdefault(Path(source.path), []).append(structure)
        for path, names in missing.items():
            self.add(
                "warning",
                path,
                f"declared structure(s) {', '.join(names)} have empty masks (they train as annotated and absent)",
            )


def check_cases(
    cases: Sequence[Case],
    template: str | None = None,
    on_case: Callable[[Case], None] | None = None,
    source: str | None = None,
) -> CheckReport:
    """Check every case's files; never raises on broken data.

    Args:
        cases: The cases to check.
        template: Template name used for every label instead of the manifest's.
        on_case: Called after each case (progress reporting).
        source: The manifest the cases came from (recorded in the report).

    Returns:
        The report.

    Raises:
        ConfigError: when ``template`` is given and unknown, or a ``FSEFT_*`` limit cannot be parsed.
    """
    if template is not None:
        get_template(template)
    limits = CTLimits.from_env()
    report = CheckReport(cases=len(cases), source=source)
    seen_ids: dict[str, Path] = {}
    seen_content: dict[str, Case] = {}
    for case in cases:
        checker = _CaseChecker(case, template, limits)
        if case.case_id in seen_ids:
            checker.add(
                "error",
                case.image,
                f"duplicate case id {case.case_id!r} (also used for {seen_ids[case.case_id]})",
            )
        seen_ids.setdefault(case.case_id, case.image)
        problems = checker.run()
        if Path(case.image).exists():
            digest = checker.guarded(Path(case.image), lambda c=case: file_fingerprint(c.image))
            if digest is not None and digest in seen_content:
                other = seen_content[digest]
                checker.add(
                    "error", case.image, f"same image content as case {other.case_id!r} ({other.image})"
                )
            elif digest is not None:
                seen_content[digest] = case
        report.problems.extend(problems)
        logger.debug("%s: %d problem(s)", case.case_id, len(problems))
        if on_case is not None:
            on_case(case)
    return report


def check_manifest(
    path: str | Path, template: str | None = None, on_case: Callable[[Case], None] | None = None
) -> CheckReport:
    """Parse a manifest and check its cases (see :func:`check_cases`); missing files are reported, not raised.

    Args:
        path: Any manifest :func:`fseft.data.manifests.load_manifest` reads.
        template: Template name used for every label instead of the manifest's.
        on_case: Called after each case.

    Returns:
        The report.

    Raises:
        FseftError: when the manifest itself cannot be parsed (missing manifest or column, duplicate id...).
    """
    from .manifests import load_manifest

    cases = load_manifest(path, template=template, require_files=False)
    return check_cases(cases, template=template, on_case=on_case, source=str(path))


__all__ = ["HU_LIMITS", "CheckReport", "Problem", "check_cases", "check_manifest"]
