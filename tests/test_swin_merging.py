"""MONAI v0.9 patch merging, chosen per model: public SwinUNETR weights compute what they were trained to."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.networks.nets.swin_unetr import PatchMerging

from fseft.config import PreprocessConfig
from fseft.errors import ConfigError
from fseft.models import ModelConfig, build_model, load_pretrained, zoo
from fseft.models.config import SWIN_MERGING_NAMES
from fseft.models.swin_merging import SWIN_MERGINGS, LegacyPatchMerging


def v09_merge(x: torch.Tensor, norm: torch.nn.Module, reduction: torch.nn.Module) -> torch.Tensor:
    """MONAI 0.9.0 ``PatchMerging.forward`` for 5D input, written out slice by slice."""
    x0 = x[:, 0::2, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, 0::2, :]
    x3 = x[:, 0::2, 0::2, 1::2, :]
    x4 = x[:, 1::2, 0::2, 1::2, :]
    x5 = x[:, 0::2, 1::2, 0::2, :]  # repeats x2
    x6 = x[:, 0::2, 0::2, 1::2, :]  # repeats x3
    x7 = x[:, 1::2, 1::2, 1::2, :]
    return reduction(norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


def swin(merging: str) -> torch.nn.Module:
    cfg = ModelConfig(arch="swinunetr", feature_size=12, structures=("liver",),
                      preprocess=PreprocessConfig(roi=(64,) * 3), swin_merging=merging)  # fmt: skip
    return build_model(cfg).eval()


def test_legacy_module_matches_v09_and_differs_from_current() -> None:
    torch.manual_seed(0)
    legacy = LegacyPatchMerging(dim=6)
    current = PatchMerging(dim=6)
    current.load_state_dict(legacy.state_dict())
    x = torch.randn(2, 4, 6, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(legacy(x), v09_merge(x, legacy.norm, legacy.reduction), rtol=0, atol=0)
        assert not torch.allclose(legacy(x), current(x), atol=1e-3)


def test_legacy_network_loaded_from_state_dict_computes_the_v09_forward() -> None:
    torch.manual_seed(1)
    state = swin("current").state_dict()
    legacy, current = swin("legacy"), swin("current")
    assert load_pretrained(legacy, state).ok and load_pretrained(current, state).ok  # same keys, both load
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        got, now = legacy(x), current(x)
        for i in range(1, 5):  # the v0.9 forward, patched into the current network's merging layers
            layer = getattr(current.backbone.swinViT, f"layers{i}")[0]
            if layer.downsample is not None:
                d = layer.downsample
                d.forward = lambda t, d=d: v09_merge(t, d.norm, d.reduction)
        torch.testing.assert_close(got, current(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, now, atol=1e-4)


def test_zoo_swinunetr_entries_use_legacy_merging_and_new_models_the_current_one() -> None:
    assert ModelConfig(structures=("liver",)).swin_merging == "current"
    assert tuple(SWIN_MERGINGS) == SWIN_MERGING_NAMES
    for name in zoo.ZOO.names():
        entry = zoo.get_entry(name)
        assert entry.swin_merging == ("legacy" if entry.arch == "swinunetr" else None), name
    with pytest.raises(ConfigError, match="swin_merging must be one of current, legacy"):
        dataclasses.replace(ModelConfig(structures=("liver",)), swin_merging="v2")
    old = ModelConfig(structures=("liver",)).to_dict()
    del old["swin_merging"]  # model files written before the field keep MONAI's current merging
    assert ModelConfig.from_dict(old).swin_merging == "current"
