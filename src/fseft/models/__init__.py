"""Foundation models: backbones, universal heads, checkpoint zoo and safe loading.

Public API: :class:`ModelConfig`, :class:`FoundationModel`, :func:`build_model`, :func:`save_model`,
:func:`load_model`, :func:`load_pretrained`, :func:`register_model_spec` (the name hub :mod:`.hub`),
:func:`sliding_window_logits`; the zoo of public checkpoints is :mod:`fseft.models.zoo`.
"""

from ..defaults import DEFAULT_MODEL
from . import bundled_models  # noqa: F401  (registers the models shipped in the package)
from .backbones import BACKBONES, BackboneSpec, RoleMap, get_backbone
from .checkpoint import LoadReport, load_model_file, load_pretrained, safe_torch_load, save_model
from .config import ModelConfig
from .foundation import FoundationModel, build_model
from .hub import MODELS, ModelSpec, load_model, model_available, model_or_default, register_model_spec
from .keymaps import LAYOUTS
from .predict import sliding_window_logits

__all__ = [
    "BACKBONES",
    "DEFAULT_MODEL",
    "LAYOUTS",
    "MODELS",
    "BackboneSpec",
    "FoundationModel",
    "LoadReport",
    "ModelConfig",
    "ModelSpec",
    "RoleMap",
    "build_model",
    "get_backbone",
    "load_model",
    "load_model_file",
    "load_pretrained",
    "model_available",
    "model_or_default",
    "register_model_spec",
    "safe_torch_load",
    "save_model",
    "sliding_window_logits",
]
