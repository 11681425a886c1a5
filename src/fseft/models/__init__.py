"""Foundation models: backbones, universal heads, checkpoint zoo and safe loading.

Public API: :class:`ModelConfig`, :class:`FoundationModel`, :func:`build_model`, :func:`save_model`,
:func:`load_model`, :func:`load_pretrained`, :func:`register_model_spec`,
:func:`sliding_window_logits`; the zoo of public checkpoints is :mod:`fseft.models.zoo`.
"""

from .backbones import BACKBONES, BackboneSpec, RoleMap, get_backbone
from .bundled_models import DEFAULT_MODEL
from .checkpoint import (
    MODELS,
    LoadReport,
    ModelSpec,
    load_model,
    load_model_file,
    load_pretrained,
    register_model_spec,
    safe_torch_load,
    save_model,
)
from .config import ModelConfig
from .foundation import FoundationModel, build_model
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
    "register_model_spec",
    "safe_torch_load",
    "save_model",
    "sliding_window_logits",
]
