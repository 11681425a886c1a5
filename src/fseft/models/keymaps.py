"""Pure per-layout renaming of public checkpoints' state dicts into fseft's key names.

fseft names: ``backbone.<network keys>`` (the wrapped MONAI SwinUNETR / BasicUNet or the public
UNet3D) and ``head.weight`` / ``head.bias`` (``[S, F, 1, 1, 1]`` / ``[S]``). A layout's ``convert``
takes the raw state dict and returns ``(renamed, dropped_keys)``; the head it returns keeps the
public model's channel order (rows are matched to structures later, by label template).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from ..registry import Registry

StateDict = dict[str, torch.Tensor]
Converted = tuple[StateDict, list[str]]

#: top-level keys under which public checkpoints keep their weights
CONTAINER_KEYS = ("state_dict", "net", "model", "model_state_dict")
#: first components of MONAI SwinTransformer (``swinViT``) keys
_SWIN_INTERNAL = ("patch_embed.", "pos_drop.", "layers1.", "layers2.", "layers3.", "layers4.")


@dataclass(frozen=True)
class Layout:
    """A public (or fseft's own) state-dict layout.

    Args:
        name: Registry name.
        description: Where checkpoints in this layout come from.
        arch: Backbone the weights belong to (``None``: any backbone).
        convert: Pure ``state_dict -> (renamed state_dict, dropped keys)``.
        expected_missing: Prefixes of model keys the layout leaves at initialisation by design
            (a headless checkpoint: ``head.``); any other missing key fails the load.
    """

    name: str
    description: str
    arch: str | None
    convert: Callable[[Mapping[str, torch.Tensor]], Converted]
    expected_missing: tuple[str, ...]


LAYOUTS: Registry[Layout] = Registry("checkpoint layout")


def extract_state_dict(obj: Any, source: str) -> StateDict:
    """The tensor mapping inside a loaded checkpoint (itself, or under ``state_dict``/``net``/``model``).

    Raises:
        CheckpointError: naming ``source`` and its top-level keys when no state dict is found.
    """
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{source}: no state dict found (top-level keys: {keys})")
    raise CheckpointError(f"{source}: expected a mapping of tensors, got {type(obj).__name__}")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def strip_prefix(key: str, prefix: str) -> str:
    """``key`` without a leading ``prefix`` (unchanged when absent)."""
    return key[len(prefix) :] if key.startswith(prefix) else key


def swin_key(key: str) -> str:
    """Normalise SwinUNETR naming variants: ``swin_vit`` -> ``swinViT``, ``mlp.fc1/fc2`` -> ``mlp.linear1/2``."""
    key = key.replace("swin_vit.", "swinViT.")
    return key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def convert_native(sd: Mapping[str, torch.Tensor]) -> Converted:
    """fseft's own names (``model.state_dict()``): unchanged."""
    return dict(sd), []


def convert_fseft_reference(sd: Mapping[str, torch.Tensor]) -> Converted:
    """The paper's reference code (jusiro/fewshot-finetuning): ``[module.][backbone.]<swinunetr>``,
    head ``classifier.*`` (29 universal classes)."""
    out: StateDict = {}
    for key, value in sd.items():
        k = swin_key(strip_prefix(strip_prefix(key, "module."), "backbone."))
        if k.startswith("out.conv.conv."):
            k = "classifier." + k[len("out.conv.conv.") :]
        out["head." + k[len("classifier.") :] if k.startswith("classifier.") else "backbone." + k] = value
    return out, []


def _universal_model(drop_inner: tuple[str, ...]) -> Callable[[Mapping[str, torch.Tensor]], Converted]:
    """CLIP-Driven Universal Model / SuPreM checkpoints: ``module.backbone.<net>`` plus text-driven
    dynamic-head modules (``precls_conv``, ``GAP``, ``controller``, ``organ_embedding``, ...), which are
    dropped together with the network's own output layer: their heads have no per-structure rows."""

    def convert(sd: Mapping[str, torch.Tensor]) -> Converted:
        out: StateDict = {}
        dropped: list[str] = []
        for key, value in sd.items():
            k = strip_prefix(key, "module.")
            inner = k[len("backbone.") :] if k.startswith("backbone.") else None
            if inner is None or inner.startswith(drop_inner):
                dropped.append(key)
            else:
                out["backbone." + swin_key(inner)] = value
        return out, dropped

    return convert


def convert_monai_ssl_swin(sd: Mapping[str, torch.Tensor]) -> Converted:
    """MONAI self-supervised Swin encoder (Tang et al., CVPR 2022, ``model_swinvit.pt``): keys
    ``module.<SwinTransformer keys>`` (or ``[module.]swin_vit.*``) with ``mlp.fc1/fc2``; the pretext
    heads (``rotation_head``, ``contrastive_head``, ``conv``/``convTrans3d``, final ``norm``) are dropped."""
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in sd.items():
        k = swin_key(strip_prefix(key, "module."))
        if k.startswith(_SWIN_INTERNAL):
            k = "swinViT." + k
        if k.startswith("swinViT."):
            out["backbone." + k] = value
        else:
            dropped.append(key)
    return out, dropped


def convert_monai_btcv_swin(sd: Mapping[str, torch.Tensor]) -> Converted:
    """MONAI research-contributions BTCV SwinUNETR: MONAI names, output ``out.conv.conv.*`` (14 classes,
    softmax with background first)."""
    out: StateDict = {}
    for key, value in sd.items():
        k = swin_key(strip_prefix(key, "module."))
        if k.startswith("out.conv.conv."):
            out["head." + k[len("out.conv.conv.") :]] = value
        else:
            out["backbone." + k] = value
    return out, []


for _layout in (
    Layout("native", "fseft's own key names (model.state_dict())", None, convert_native, ()),
    Layout(
        "fseft-reference",
        "paper reference code jusiro/fewshot-finetuning (SwinUNETR + 29-class 'classifier')",
        "swinunetr",
        convert_fseft_reference,
        expected_missing=(),
    ),
    Layout(
        "universal-model-swin",
        "CLIP-Driven Universal Model / SuPreM SwinUNETR ('net': module.backbone.*)",
        "swinunetr",
        _universal_model(("out.",)),
        expected_missing=("head.",),
    ),
    Layout(
        "universal-model-unet",
        "CLIP-Driven Universal Model / SuPreM UNet3D ('net': module.backbone.*)",
        "unet3d",
        _universal_model(("out_tr.",)),
        expected_missing=("head.",),
    ),
    Layout(
        "monai-ssl-swin",
        "MONAI self-supervised Swin encoder (Tang et al. 2022, model_swinvit.pt)",
        "swinunetr",
        convert_monai_ssl_swin,
        expected_missing=("backbone.encoder", "backbone.decoder", "head."),
    ),
    Layout(
        "monai-btcv-swin",
        "MONAI research-contributions BTCV SwinUNETR (out.conv.conv, 14 classes)",
        "swinunetr",
        convert_monai_btcv_swin,
        expected_missing=(),
    ),
):
    LAYOUTS.add(_layout.name, _layout)
