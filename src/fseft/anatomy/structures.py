"""Canonical anatomical structures with synonyms, read lazily from ``structures.yaml``.

Every name that enters fseft (templates, manifests, CLI flags, checkpoints) is resolved with
:func:`canonical`, so ``"IVC"``, ``"postcava"`` and ``"Inferior vena cava"`` are one structure.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._yaml import read_yaml_mapping

REGIONS = ("abdomen", "thorax", "pelvis", "head_neck", "spine", "upper_limb", "lower_limb", "whole_body")
KINDS = ("organ", "vessel", "bone", "cartilage", "muscle", "tumor", "lesion", "target", "lumped")
SIDES = ("left", "right")

UNIVERSAL_29: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "duodenum",
    "urinary_bladder",
    "prostate_or_uterus",
    "liver_tumor",
    "kidney_tumor",
    "kidney_cyst",
    "celiac_trunk",
    "lung_right",
    "lung_left",
    "bone",
    "brain",
    "lung_tumor",
    "pancreas_tumor",
    "hepatic_vessel",
    "hepatic_vessel_tumor",
    "colon_tumor",
)
"""The paper's 29-structure universal template, in the paper's order (canonical names; the paper's
``postcava`` and ``bladder`` are synonyms of ``inferior_vena_cava`` and ``urinary_bladder``)."""

OPENKBP_ORGANS: tuple[str, ...] = (
    "brainstem",
    "spinal_cord",
    "parotid_right",
    "parotid_left",
    "esophagus",
    "larynx",
    "mandible",
)
"""OpenKBP head-and-neck organs at risk, in the order of their label values 1..7."""

OPENKBP_TARGETS: tuple[str, ...] = ("ptv56", "ptv63", "ptv70")
"""OpenKBP planning target volumes, in the order of their label values 1..3."""

_FIELDS = ("region", "kind", "side", "pair", "parts", "synonyms", "snomed")
_NAME = re.compile(r"^[a-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Structure:
    """One anatomical structure.

    Args:
        name: Canonical name (snake_case; TotalSegmentator v2 spelling where it has one).
        region: Body region (one of :data:`REGIONS`).
        kind: What it is (one of :data:`KINDS`); ``"lumped"`` means both sides in one label.
        side: ``"left"`` or ``"right"`` (the patient's) for lateral structures, else ``None``.
        pair: Canonical name of the same structure on the other side, if there is one.
        parts: For a lumped structure, the canonical ``(right, left)`` structures it splits into.
        synonyms: Other accepted names.
        snomed: SNOMED CT concept id of the structure without its side (DICOM coding scheme ``SCT``),
            when one is known; DICOM outputs code the structure with it.
    """

    name: str
    region: str
    kind: str
    side: str | None = None
    pair: str | None = None
    parts: tuple[str, str] | None = None
    synonyms: tuple[str, ...] = ()
    snomed: str | None = None


def name_key(name: str) -> str:
    """The lookup key of a name: camelCase split, lower case, runs of spaces/hyphens/underscores as ``_``.

    Args:
        name: Any spelling of a name (``"RightParotid"``, ``"kidney-left"``, ``"Spinal cord"``).

    Returns:
        The normalised key (``"right_parotid"``, ``"kidney_left"``, ``"spinal_cord"``).
    """
    split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    return re.sub(r"[\s_\-]+", "_", split.lower()).strip("_")


def _side_swapped(key: str) -> str | None:
    """``"kidney_left"`` -> ``"left_kidney"`` (the other common word order); ``None`` if not sided."""
    for side in SIDES:
        if key.endswith("_" + side):
            return f"{side}_{key[: -len(side) - 1]}"
    return None


@dataclass(frozen=True)
class _Index:
    structures: dict[str, Structure]
    keys: dict[str, str]


def _parse_entry(path: Path, name: Any, spec: Any) -> Structure:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: structure name {name!r} must be snake_case starting with a letter")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: structure {name!r} must map to a mapping of {', '.join(_FIELDS)}")
    unknown = sorted(set(spec) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"{path}: structure {name!r} has unknown field(s) {unknown}; valid: {list(_FIELDS)}"
        )
    region, kind, side = spec.get("region"), spec.get("kind"), spec.get("side")
    if region not in REGIONS:
        raise ConfigError(
            f"{path}: structure {name!r} has region {region!r}; choose one of: {', '.join(REGIONS)}"
        )
    if kind not in KINDS:
        raise ConfigError(f"{path}: structure {name!r} has kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if side is not None and side not in SIDES:
        raise ConfigError(f"{path}: structure {name!r} has side {side!r}; use left, right or omit it")
    synonyms = spec.get("synonyms", [])
    if not isinstance(synonyms, list) or not all(isinstance(s, str) and name_key(s) for s in synonyms):
        raise ConfigError(f"{path}: structure {name!r} synonyms must be a list of non-empty strings")
    parts = spec.get("parts")
    if parts is not None and (
        kind != "lumped"
        or not isinstance(parts, list)
        or len(parts) != 2
        or not all(isinstance(p, str) for p in parts)
    ):
        raise ConfigError(f"{path}: structure {name!r}: only lumped structures have parts, as [right, left]")
    if kind == "lumped" and (parts is None or side is not None):
        raise ConfigError(f"{path}: lumped structure {name!r} needs parts [right, left] and no side")
    pair = spec.get("pair")
    if pair is not None and (not isinstance(pair, str) or side is None):
        raise ConfigError(f"{path}: structure {name!r} has a pair but no side")
    snomed = spec.get("snomed")
    if snomed is not None and (isinstance(snomed, bool) or not str(snomed).isdigit()):
        raise ConfigError(f"{path}: structure {name!r} snomed must be a SNOMED CT concept id (digits)")
    return Structure(
        name=name,
        region=region,
        kind=kind,
        side=side,
        pair=pair,
        parts=(parts[0], parts[1]) if parts else None,
        synonyms=tuple(synonyms),
        snomed=None if snomed is None else str(snomed),
    )


def _check_links(path: Path, structures: dict[str, Structure]) -> None:
    for s in structures.values():
        if s.pair is not None:
            other = structures.get(s.pair)
            if other is None or other.pair != s.name or other.side == s.side:
                raise ConfigError(
                    f"{path}: structure {s.name!r} pairs with {s.pair!r}, which must exist, "
                    "pair back and lie on the other side"
                )
        if s.parts is not None:
            right, left = (structures.get(p) for p in s.parts)
            if right is None or left is None or right.side != "right" or left.side != "left":
                raise ConfigError(
                    f"{path}: lumped structure {s.name!r} parts {list(s.parts)} must be existing "
                    "[right, left] structures"
                )


def _build_index(path: Path) -> _Index:
    data = read_yaml_mapping(path)
    structures = {name: _parse_entry(path, name, spec) for name, spec in data.items()}
    _check_links(path, structures)
    keys: dict[str, str] = {}
    for s in structures.values():
        spellings = [name_key(s.name), *(name_key(x) for x in s.synonyms)]
        spellings += [k for k in map(_side_swapped, spellings) if k is not None]
        for key in dict.fromkeys(spellings):
            owner = keys.setdefault(key, s.name)
            if owner != s.name:
                raise ConfigError(
                    f"{path}: name {key!r} of structure {s.name!r} is already a name of {owner!r}"
                )
    return _Index(structures=structures, keys=keys)


@lru_cache(maxsize=1)
def _index() -> _Index:
    with resources.as_file(resources.files("fseft.anatomy") / "structures.yaml") as path:
        return _build_index(Path(path))


def canonical(name: str) -> str:
    """Resolve any accepted spelling of a structure to its canonical name.

    Matching ignores case and treats spaces, hyphens, underscores and camelCase boundaries alike;
    ``left_X``/``right_X`` resolve to ``X_left``/``X_right``.

    Args:
        name: A canonical name or synonym (``"IVC"``, ``"Right Kidney"``, ``"SpinalCord"``).

    Returns:
        The canonical name (``"inferior_vena_cava"``, ``"kidney_right"``, ``"spinal_cord"``).

    Raises:
        ConfigError: when the name is unknown, suggesting close matches.
    """
    index = _index()
    key = name_key(name) if isinstance(name, str) else ""
    if key in index.keys:
        return index.keys[key]
    close = difflib.get_close_matches(key, list(index.keys), n=8, cutoff=0.75)
    suggestions = list(dict.fromkeys(index.keys[k] for k in close))[:5]
    hint = f"did you mean: {', '.join(suggestions)}?" if suggestions else "no close match"
    raise ConfigError(
        f"unknown structure {name!r}; {hint} (fseft.anatomy.structure_names() lists all {len(index.structures)})"
    )


def get_structure(name: str) -> Structure:
    """The :class:`Structure` for any accepted spelling of its name.

    Raises:
        ConfigError: when the name is unknown (see :func:`canonical`).
    """
    return _index().structures[canonical(name)]


def structure_names() -> list[str]:
    """All canonical structure names, sorted."""
    return sorted(_index().structures)
