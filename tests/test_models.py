"""Foundation models: backbones, role maps, head rows, save/load, safe loading, sliding window."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from torch import nn

from fseft.config import PreprocessConfig
from fseft.errors import CheckpointError, ConfigError
from fseft.models import (
    MODELS,
    FoundationModel,
    ModelConfig,
    build_model,
    load_model,
    register_model_spec,
    save_model,
    sliding_window_logits,
)

STRUCTS = ("liver", "kidney_right", "spleen")


def small_cfg(arch: str = "unet-small", feature_size: int = 8, roi: int = 32, **kw) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        feature_size=feature_size,
        structures=STRUCTS,
        preprocess=PreprocessConfig(roi=(roi,) * 3),
        **kw,
    )


@pytest.fixture(scope="module")
def swin() -> FoundationModel:
    torch.manual_seed(0)
    return build_model(small_cfg("swinunetr", 12, 64)).eval()


@pytest.mark.parametrize("arch", ["unet-small", "unet3d", "resunet"])
def test_unet_features_and_logits_shapes(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg(arch)).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        feats, logits = model.features(x), model(x)
    assert feats.shape == (2, 8, 32, 32, 32) and model.feature_channels == 8
    assert logits.shape == (2, len(STRUCTS), 32, 32, 32)
    torch.testing.assert_close(logits, model.head(feats))


@pytest.mark.slow  # one SwinUNETR forward at the smallest legal size (64^3, feature 12)
def test_swin_features_and_logits(swin: FoundationModel) -> None:
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        feats = swin.features(x)
        logits = swin.head(feats)
    assert feats.shape == (1, 12, 64, 64, 64)
    assert logits.shape == (1, 3, 64, 64, 64)
    assert (
        not isinstance(swin.backbone.out, nn.Conv3d)
        and "backbone.out.conv.conv.weight" not in swin.state_dict()
    )


def test_swin_rejects_illegal_roi_and_width() -> None:
    with pytest.raises(ConfigError, match=r"multiple of 32 and at least 64"):
        build_model(
            dataclasses.replace(small_cfg("swinunetr", 12, 64), preprocess=PreprocessConfig(roi=(96, 96, 80)))
        )
    with pytest.raises(ConfigError, match=r"at least 64"):
        build_model(small_cfg("swinunetr", 12, 32))
    with pytest.raises(ConfigError, match="multiple of 12"):
        build_model(small_cfg("swinunetr", 16, 64))


def test_features_rejects_bad_input(swin: FoundationModel) -> None:
    with pytest.raises(ConfigError, match=r"multiple of 32"):
        swin.features(torch.rand(1, 1, 64, 64, 48))
    with pytest.raises(ConfigError, match=r"expects input \[B, 1"):
        swin.features(torch.rand(1, 2, 64, 64, 64))


def test_unknown_arch_lists_backbones() -> None:
    with pytest.raises(ConfigError, match="resunet, swinunetr, unet-small, unet3d"):
        build_model(small_cfg("resnet"))


def _role_params(model: FoundationModel, roles: list[str]) -> list[int]:
    return [id(p) for r in roles for m in model.role(r).values() for p in m.parameters()]


@pytest.mark.parametrize("arch", ["unet-small", "unet3d", "resunet", "swinunetr"])
def test_roles_partition_parameters_and_resolve_by_name(arch: str, swin: FoundationModel) -> None:
    model = swin if arch == "swinunetr" else build_model(small_cfg(arch))
    covered = _role_params(model, ["encoder", "bottleneck", "decoder", "head"])
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    for group in model.roles.values():
        for name, module in group.items():
            assert model.get_submodule(name) is module
    if arch == "swinunetr":
        assert len(model.role("qkv")) == 8 and all(
            isinstance(m, nn.Linear) for m in model.role("qkv").values()
        )
        assert all(m.out_features == 3 * m.in_features for m in model.role("qkv").values())
        assert all(isinstance(m, nn.LayerNorm) for m in model.role("norm").values())
        assert len(model.role("mlp")) == 16
        encoder = {id(p) for p in model.backbone.swinViT.parameters()}
        assert set(_role_params(model, ["qkv", "mlp", "norm", "proj"])) <= encoder
    else:
        assert all(isinstance(m, nn.Conv3d) for m in model.role("conv").values())
        assert len(model.role("conv")) == len(model.role("norm")) > 0
        with pytest.raises(ConfigError, match="has no role 'qkv'; roles: encoder"):
            model.role("qkv")


def test_head_row_and_synonyms() -> None:
    model = build_model(small_cfg())
    w, b = model.head_row("Kidney R")  # synonym of kidney_right
    torch.testing.assert_close(w, model.head.weight[1, :, 0, 0, 0])
    torch.testing.assert_close(b, model.head.bias[1])
    assert w.shape == (8,) and b.shape == ()
    w += 1  # a copy: the model is untouched
    assert not torch.equal(w, model.head.weight[1, :, 0, 0, 0])
    with pytest.raises(ConfigError, match="known: liver, kidney_right, spleen"):
        model.head_row("pancreas")


def test_config_canonicalises_and_round_trips() -> None:
    cfg = ModelConfig(arch="unet-small", feature_size=8, structures=("Liver", "kidney_r"))
    assert cfg.structures == ("liver", "kidney_right")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="more than once"):
        ModelConfig(structures=("liver", "LIVER"))
    with pytest.raises(ConfigError, match="at least one structure"):
        ModelConfig(structures=())


def test_save_load_round_trip_is_bit_exact(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(1)
    model = build_model(small_cfg("unet3d")).eval()
    path = save_model(model, tmp_path / "m.pt", extra={"epochs": 3, "note": "x"})
    loaded = load_model(path).eval()
    assert loaded.config == model.config and loaded.extra == {"epochs": 3, "note": "x"}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.fingerprint() == model.fingerprint()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert model.fingerprint() == loaded.fingerprint()  # batch-stat norms never touch running stats
    with pytest.raises(ConfigError, match="JSON-able"):
        save_model(model, tmp_path / "bad.pt", extra={"t": object()})


def test_fingerprint_changes_with_any_weight() -> None:
    model = build_model(small_cfg())
    before = model.fingerprint()
    assert len(before) == 16 and before == model.fingerprint()
    with torch.no_grad():
        model.backbone.down_2.convs.conv_0.conv.weight[0, 0, 0, 0, 0] += 1e-3
    assert model.fingerprint() != before


class _Payload:
    """Pickles into a call that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_not_executed(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "fseft-model", "state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load"):
        load_model(path)
    assert not marker.exists()


def test_bad_files_name_the_file(tmp_path: pathlib.Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable PyTorch checkpoint"):
        load_model(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an fseft model file"):
        load_model(foreign)
    with pytest.raises(CheckpointError, match=r"missing\.pt: model file not found"):
        load_model(tmp_path / "missing.pt")


def test_strict_load_rejects_mismatched_weights(tmp_path: pathlib.Path) -> None:
    path = save_model(build_model(small_cfg()), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop("head.bias")
    payload["state_dict"]["extra.weight"] = torch.zeros(2)
    torch.save(payload, path)
    with pytest.raises(
        CheckpointError, match=r"m\.pt: does not match the model: .*missing 1 \(head\.bias\), unexpected 1"
    ):
        load_model(path)
    assert load_model(path, allow_partial=True).config == small_cfg()


def test_registered_model_spec_loads_by_name(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))  # keep the global registry clean
    model = build_model(small_cfg())
    register_model_spec("unet-small.test", save_model(model, tmp_path / "m.pt"), "test model")
    assert load_model("unet-small.test").fingerprint() == model.fingerprint()
    with pytest.raises(ConfigError, match="duplicate model 'unet-small.test'"):
        register_model_spec("unet-small.test", tmp_path / "m.pt")
    with pytest.raises(
        ConfigError, match=r"unknown model 'nope'.*unet-small\.test.*zoo: swinunetr48\.clip-driven"
    ):
        load_model("nope")


def test_sliding_window_pads_small_volumes_and_matches_single_window() -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    small = torch.rand(1, 1, 20, 40, 36)
    with torch.no_grad():
        out = sliding_window_logits(model, small, roi=(32, 32, 32), overlap=0.25, sw_batch_size=2)
        assert out.shape == (1, 3, 20, 40, 36) and type(out) is torch.Tensor
        exact = torch.rand(1, 1, 32, 32, 32)
        torch.testing.assert_close(sliding_window_logits(model, exact, roi=(32, 32, 32)), model(exact))
    with pytest.raises(ConfigError, match="multiple of 16"):
        sliding_window_logits(model, small, roi=(24, 32, 32))
    with pytest.raises(ConfigError, match="overlap"):
        sliding_window_logits(model, small, roi=(32, 32, 32), overlap=1.0)
