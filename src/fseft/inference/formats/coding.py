"""DICOM codes of structures: SNOMED CT concepts from the anatomy registry, verified in pydicom's tables.

A structure with a ``snomed`` concept in :mod:`fseft.anatomy` is coded with it (scheme ``SCT``, the
meaning pydicom's DICOM code tables give it) plus a Left/Right modifier for lateral structures, under
the category its kind implies (anatomical structure, morphologically abnormal structure, or spatial
concept for planning targets). A structure without one gets a local code (scheme ``99FSEFT``, private
by DICOM's rule for schemes starting with ``99``) whose meaning is its name in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.sr._concepts_dict import concepts
from pydicom.sr.coding import Code

from ...anatomy import get_structure
from ...errors import ConfigError

LOCAL_SCHEME = "99FSEFT"
#: DCMR context group "Segmentation Property Types".
SEGMENTATION_TYPES_CID = 7151
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
SPATIAL_CONCEPT = Code("309825002", "SCT", "Spatial and Relational Concept")
LATERALITY = {"left": Code("7771000", "SCT", "Left"), "right": Code("24028007", "SCT", "Right")}
_CATEGORY_BY_KIND = {"tumor": ABNORMAL_STRUCTURE, "lesion": ABNORMAL_STRUCTURE, "target": SPATIAL_CONCEPT}
#: RT ROI Interpreted Type by structure kind (others: empty, the clinician's call).
RT_TYPE_BY_KIND = {"organ": "ORGAN", "vessel": "ORGAN", "bone": "ORGAN", "cartilage": "ORGAN",
                   "muscle": "ORGAN", "lumped": "ORGAN", "target": "PTV"}  # fmt: skip


@dataclass(frozen=True)
class StructureCode:
    """How one structure is coded in DICOM.

    Args:
        label: Human-readable label (the structure's name).
        category: Segmented property category.
        type: Segmented property type (SNOMED CT, or local).
        modifier: Laterality modifier of ``type``, for lateral structures.
        rt_type: RT ROI Interpreted Type (``ORGAN``, ``PTV`` or empty).
    """

    label: str
    category: Code
    type: Code
    modifier: Code | None
    rt_type: str


def structure_code(name: str) -> StructureCode:
    """The DICOM coding of a structure (any name; unknown ones get a local code).

    Raises:
        ConfigError: When the anatomy registry names a SNOMED concept pydicom's tables lack.
    """
    try:
        structure = get_structure(name)
    except ConfigError:
        words = name.replace("_", " ")
        return StructureCode(name, ANATOMICAL_STRUCTURE, Code(name, LOCAL_SCHEME, words[:64]), None, "")
    category = _CATEGORY_BY_KIND.get(structure.kind, ANATOMICAL_STRUCTURE)
    if structure.snomed is None:
        kind = Code(structure.name, LOCAL_SCHEME, structure.name.replace("_", " ")[:64])
    else:
        kind = Code(structure.snomed, "SCT", snomed_meaning(structure.snomed))
    modifier = LATERALITY.get(structure.side or "")
    return StructureCode(structure.name, category, kind, modifier, RT_TYPE_BY_KIND.get(structure.kind, ""))


def snomed_meaning(concept: str) -> str:
    """The meaning pydicom's DICOM tables give a SNOMED CT concept (see :func:`_snomed_table` for the order).

    Raises:
        ConfigError: When the tables do not hold the concept.
    """
    meanings = _snomed_table().get(concept)
    if not meanings:
        raise ConfigError(f"SNOMED CT concept {concept} is not in pydicom's DICOM code tables")
    return meanings[0]


@lru_cache(maxsize=1)
def _snomed_table() -> dict[str, list[str]]:
    """Concept id -> meanings: those of segmentation property types (CID 7151) first, then those of
    other context groups, then the rest."""
    table: dict[str, list[tuple[int, str]]] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, cids) in entries.items():
            rank = 0 if SEGMENTATION_TYPES_CID in cids else 1 if cids else 2
            table.setdefault(value, []).append((rank, meaning))
    return {value: [m for _, m in sorted(found)] for value, found in table.items()}
