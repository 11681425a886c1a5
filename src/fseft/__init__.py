"""fseft: few-shot parameter-efficient fine-tuning of volumetric CT segmentation foundation models.

Implements (and extends) Silva-Rodríguez, Dolz & Ben Ayed, "Towards Foundation Models and Few-Shot
Parameter-Efficient Fine-Tuning for Volumetric Organ Segmentation", Medical Image Analysis 2025
(arXiv 2303.17051).
"""

from typing import Any

__version__ = "0.1.0"

#: public names imported on first use, so ``import fseft`` stays light: name -> module
_LAZY = {"adapt": "fseft.adapt"}


def __getattr__(name: str) -> Any:
    """Lazy public API: ``fseft.adapt(model, support, structures, ...)`` (:func:`fseft.adapt.api.adapt`)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'fseft' has no attribute {name!r}")
