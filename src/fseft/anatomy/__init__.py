"""Universal anatomy: canonical structures with synonyms and declarative dataset templates.

Structures live in ``structures.yaml`` and dataset label maps in ``templates/<dataset>.yaml``; both
are package data, read on first use and cached. Every structure name is resolved with
:func:`canonical`; every dataset's labels become canonical structures through its
:class:`DatasetTemplate`.
"""

from .catalog import get_template, register_template, register_template_file, template_names
from .structures import (
    KINDS,
    OPENKBP_ORGANS,
    OPENKBP_TARGETS,
    REGIONS,
    UNIVERSAL_29,
    Structure,
    canonical,
    get_structure,
    structure_names,
)
from .templates import DatasetTemplate, load_template_file

__all__ = [
    "KINDS",
    "OPENKBP_ORGANS",
    "OPENKBP_TARGETS",
    "REGIONS",
    "UNIVERSAL_29",
    "DatasetTemplate",
    "Structure",
    "canonical",
    "get_structure",
    "get_template",
    "load_template_file",
    "register_template",
    "register_template_file",
    "structure_names",
    "template_names",
]
