"""Dataset templates: which label value (or mask file) of a dataset holds which canonical structure.

A template is data (``templates/<dataset>.yaml``), validated when loaded: every structure must
resolve through :func:`~fseft.anatomy.structures.canonical`, values and structures are unique, and
split rules name a lumped structure and its ``[right, left]`` parts.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np

from ..errors import ConfigError, DataError, GeometryError
from ._yaml import read_yaml_mapping
from .midline import check_affine, split_right_left
from .structures import canonical, get_structure

LAYOUTS = ("labelmap", "mask-files")
_KEYS = ("name", "description", "source", "citation", "layout", "labels", "mask_files", "split_rules")


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    for v in sorted(values):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


@dataclass(frozen=True)
class DatasetTemplate:
    """How one dataset stores its annotations, in canonical structure names.

    Args:
        name: Template name (looked up case-insensitively, ``_``/space read as ``-``).
        layout: ``"labelmap"`` (one integer map, ``labels``) or ``"mask-files"`` (one binary mask file
            per structure, ``mask_files``).
        labels: Label value (>= 1; 0 is background) -> structure.
        mask_files: Mask file stem (``"liver"`` for ``liver.nii.gz``) -> structure.
        split_rules: Lumped structure -> its ``(right, left)`` parts, split at the body midline.
        description: What the dataset annotates.
        source: Where the dataset and its label values are published (URL).
        citation: The dataset's reference.
        path: The YAML file the template came from, if any (named in error messages).

    Raises:
        ConfigError: naming the template (file) when a structure is unknown, a structure or value
            repeats, or a split rule does not fit.
    """

    name: str
    layout: str = "labelmap"
    labels: Mapping[int, str] = field(default_factory=dict)
    mask_files: Mapping[str, str] = field(default_factory=dict)
    split_rules: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    citation: str = ""
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"{self.path or 'dataset template'}: a template needs a non-empty name")
        if self.layout not in LAYOUTS:
            self._fail(f"layout {self.layout!r} is not one of: {', '.join(LAYOUTS)}")
        labels: dict[int, str] = {}
        for value, name in dict(self.labels).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                self._fail(f"label value {value!r} must be an integer >= 1 (0 is background)")
            labels[int(value)] = self._resolve(name, f"label {value}")
        files = {
            str(stem): self._resolve(name, f"mask file {stem!r}")
            for stem, name in dict(self.mask_files).items()
        }
        if self.layout == "labelmap" and (not labels or files):
            self._fail("a labelmap template needs labels and no mask_files")
        if self.layout == "mask-files" and (not files or labels):
            self._fail("a mask-files template needs mask_files and no labels")
        if any(not stem or "/" in stem or "\\" in stem for stem in files):
            self._fail("mask file stems must be plain file names without folders")
        given: Mapping[Any, str] = labels if self.layout == "labelmap" else files
        seen: dict[str, Any] = {}
        for where, name in given.items():
            if name in seen:
                self._fail(f"structure {name!r} is given twice ({seen[name]!r} and {where!r})")
            seen[name] = where
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(labels.items()))))
        object.__setattr__(self, "mask_files", MappingProxyType(files))
        object.__setattr__(self, "split_rules", MappingProxyType(self._check_split_rules(set(seen))))

    def __hash__(self) -> int:
        return hash(
            (
                self.name,
                self.layout,
                *self.labels.items(),
                *self.mask_files.items(),
                *self.split_rules.items(),
            )
        )

    def _fail(self, problem: str) -> NoReturn:
        where = self.path if self.path is not None else f"dataset template {self.name!r}"
        raise ConfigError(f"{where}: {problem}")

    def _resolve(self, name: Any, where: str) -> str:
        if not isinstance(name, str):
            self._fail(f"{where} must name a structure, got {name!r}")
        try:
            return canonical(name)
        except ConfigError as e:
            self._fail(f"{where}: {e}")

    def _check_split_rules(self, annotated: set[str]) -> dict[str, tuple[str, str]]:
        rules: dict[str, tuple[str, str]] = {}
        for lumped, parts in dict(self.split_rules).items():
            name = self._resolve(lumped, "split rule")
            structure = get_structure(name)
            if structure.parts is None:
                self._fail(f"split rule {lumped!r}: {name!r} is not a lumped structure")
            if name not in annotated:
                self._fail(f"split rule {lumped!r}: the template does not annotate {name!r}")
            if not isinstance(parts, (list, tuple)) or len(parts) != 2:
                self._fail(f"split rule {lumped!r} must give [right, left], got {parts!r}")
            pair = (self._resolve(parts[0], "split rule"), self._resolve(parts[1], "split rule"))
            if pair != structure.parts:
                self._fail(
                    f"split rule {lumped!r} must give [right, left] = {list(structure.parts)}, got {list(pair)}"
                )
            clash = sorted(set(pair) & annotated)
            if clash:
                self._fail(
                    f"split rule {lumped!r} produces {clash}, which the template also annotates directly"
                )
            rules[name] = pair
        return rules

    def _annotated(self) -> tuple[str, ...]:
        return tuple(self.labels.values()) if self.layout == "labelmap" else tuple(self.mask_files.values())

    @property
    def structures(self) -> tuple[str, ...]:
        """Canonical structures the template annotates, lumped ones replaced by their split parts."""
        return tuple(part for s in self._annotated() for part in self.split_rules.get(s, (s,)))

    def value_of(self, structure: str) -> int:
        """Label value whose voxels hold ``structure`` (for a split part: the lumped structure's value).

        Raises:
            ConfigError: when the template is not a labelmap or does not annotate ``structure``.
        """
        if self.layout != "labelmap":
            self._fail(f"layout {self.layout} has no label values; its files are in mask_files")
        name = canonical(structure)
        for value, held in self.labels.items():
            if name == held or name in self.split_rules.get(held, ()):
                return value
        self._fail(f"does not annotate {name!r}; it annotates: {', '.join(self.structures)}")

    def to_structure_map(
        self,
        label: np.ndarray,
        affine: np.ndarray,
        body: np.ndarray | None = None,
        *,
        source: str | Path | None = None,
    ) -> dict[str, np.ndarray]:
        """One boolean mask per structure of :attr:`structures` from a label map.

        Args:
            label: Integer label map ``[X, Y, Z]`` in this template's values (0 background).
            affine: Its 4x4 voxel-to-RAS+ world matrix (used by split rules).
            body: Optional body mask on the same grid; its mean world x is the left/right midline.
                Without it, each lumped structure is split at its own mean world x.
            source: The label file, named in error messages.

        Returns:
            ``{canonical name: bool mask}`` in :attr:`structures` order (empty masks included).

        Raises:
            ConfigError: when the template's layout is not ``labelmap``.
            DataError: naming the label values present in ``label`` that the template does not define.
            GeometryError: on a bad affine or a ``body`` whose shape differs from ``label``.
        """
        if self.layout != "labelmap":
            self._fail("is a mask-files template: read each file in mask_files and call split_lumped()")
        where = source if source is not None else "label map"
        arr = np.asarray(label)
        if arr.ndim != 3:
            raise DataError(f"{where}: expected a 3D label map, got shape {arr.shape}")
        if body is not None and np.shape(body) != arr.shape:
            raise GeometryError(
                f"{where}: body mask shape {np.shape(body)} differs from the label shape {arr.shape}"
            )
        known = np.isin(arr, np.asarray([0, *self.labels]))
        if not known.all():
            bad = np.unique(arr[~known])
            shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in bad[:10].tolist())
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            raise DataError(
                f"{where}: label value(s) {shown}{more} not defined by template {self.name!r} "
                f"(it defines 0 = background, {_ranges(list(self.labels))})"
            )
        masks = {name: arr == value for value, name in self.labels.items()}
        return self.split_lumped(masks, affine, body)

    def split_lumped(
        self, masks: Mapping[str, np.ndarray], affine: np.ndarray, body: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Apply the split rules to per-structure masks (as read from a mask-files layout).

        Args:
            masks: Structure name -> boolean mask, all on one grid.
            affine: The grid's 4x4 voxel-to-RAS+ world matrix.
            body: Optional body mask on the same grid (see :meth:`to_structure_map`).

        Returns:
            ``{canonical name: bool mask}``, each lumped structure replaced by its right and left parts.

        Raises:
            ConfigError: when a name is not a known structure.
            GeometryError: on a bad affine or a ``body`` whose shape differs from the masks.
        """
        a = check_affine(affine)
        out: dict[str, np.ndarray] = {}
        for name, mask in masks.items():
            structure = canonical(name)
            if structure in self.split_rules:
                right_name, left_name = self.split_rules[structure]
                out[right_name], out[left_name] = split_right_left(mask, a, body)
            else:
                out[structure] = np.asarray(mask, dtype=bool)
        return out


def _int_value(path: Path, key: Any) -> int:
    if isinstance(key, bool):
        raise ConfigError(f"{path}: label value {key!r} must be an integer")
    try:
        return int(str(key).strip()) if not isinstance(key, int) else key
    except ValueError:
        raise ConfigError(f"{path}: label value {key!r} must be an integer") from None


def load_template_file(path: str | Path) -> DatasetTemplate:
    """Read and validate one dataset template YAML file.

    Args:
        path: A YAML file with ``name``, ``layout``, ``labels`` or ``mask_files`` and optional
            ``split_rules``, ``description``, ``source``, ``citation``.

    Returns:
        The validated template.

    Raises:
        ConfigError: naming the file on any schema or content problem.
    """
    p = Path(path)
    data = read_yaml_mapping(p)
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown}; valid: {list(_KEYS)}")
    for key in ("labels", "mask_files", "split_rules"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{p}: {key} must be a mapping")
    for key in ("name", "layout", "description", "source", "citation"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{p}: {key} must be a string")
    labels: dict[int, Any] = {}
    for key, name in data.get("labels", {}).items():
        value = _int_value(p, key)
        if value in labels:
            raise ConfigError(f"{p}: label value {value} is given twice")
        labels[value] = name
    return DatasetTemplate(
        name=data.get("name", ""),
        layout=data.get("layout", "labelmap"),
        labels=labels,
        mask_files={str(k): v for k, v in data.get("mask_files", {}).items()},
        split_rules=data.get("split_rules", {}),
        description=data.get("description", "").strip(),
        source=data.get("source", "").strip(),
        citation=data.get("citation", "").strip(),
        path=p,
    )
