"""Few-shot adaptation: the method registry, the adapted model, adapter files and the trainer.

Public API: :func:`apply_method` (peft's ``get_peft_model``), :class:`AdaptedModel`,
:func:`list_methods`, :func:`get_method`, :class:`MethodConfig`, :class:`AdaptMethod`,
:func:`register_method`, :func:`save_adapter`, :func:`load_adapter`, :func:`read_adapter_header`;
the one entry point :func:`fseft.adapt.api.adapt` (also callable as ``fseft.adapt(...)``), which
returns an :class:`~fseft.adapt.api.AdaptResult` that saves itself; constrained transductive
inference lives in :mod:`fseft.adapt.transductive`.
"""

import sys
import types
from typing import Any

from .adapter_io import load_adapter, read_adapter_header, save_adapter
from .methods import METHODS, AdaptMethod, MethodConfig, get_method, list_methods, register_method
from .model import AdaptedModel, apply_method, initial_head


class _AdaptModule(types.ModuleType):
    """Makes the package itself callable, so ``fseft.adapt(...)`` is :func:`fseft.adapt.api.adapt`
    (the name ``fseft.adapt`` is this package once it is imported, so it cannot be a plain function)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import adapt

        return adapt(*args, **kwargs)


sys.modules[__name__].__class__ = _AdaptModule

__all__ = [
    "METHODS",
    "AdaptMethod",
    "AdaptedModel",
    "MethodConfig",
    "apply_method",
    "get_method",
    "initial_head",
    "list_methods",
    "load_adapter",
    "read_adapter_header",
    "register_method",
    "save_adapter",
]
