"""Adaptation methods: one module per method, each registered in :data:`METHODS` on import.

Adding a method is one file: a config dataclass (a :class:`MethodConfig` subclass) and a class
(an :class:`AdaptMethod` subclass decorated with :func:`register_method`) that declares what it adds
(``inject``) and what trains (``trainable``); import it below.
"""

from . import (  # noqa: F401  (each import registers its methods)
    adapter_cnn,
    adaptformer,
    affine_ln,
    bitfit,
    compacter,
    full_ft,
    linear_probe,
    lora,
    scratch,
    spatial_adapter,
    zero_shot,
)
from .base import (
    LR_WITH_DECODER,
    METHODS,
    POLICIES,
    AdaptMethod,
    MethodConfig,
    Policy,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "LR_WITH_DECODER",
    "METHODS",
    "POLICIES",
    "AdaptMethod",
    "MethodConfig",
    "Policy",
    "get_method",
    "list_methods",
    "register_method",
]
