"""Adapter files: only trained tensors, bit-exact round trips, fingerprint and format checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fseft.adapt import (
    AdaptedModel,
    apply_method,
    list_methods,
    load_adapter,
    read_adapter_header,
    save_adapter,
)
from fseft.adapt.methods.lora import LoRAConfig
from fseft.config import PreprocessConfig
from fseft.errors import CheckpointError, ConfigError
from fseft.models import FoundationModel, ModelConfig, build_model

STRUCTS = ("liver", "kidney_right", "spleen")
UNET_METHODS = sorted(set(list_methods()) - {"adaptformer", "compacter"})


def _build(arch: str = "unet-small", feature_size: int = 8, roi: int = 32, seed: int = 0) -> FoundationModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch, feature_size=feature_size, structures=STRUCTS, preprocess=PreprocessConfig(roi=(roi,) * 3)
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def unet() -> FoundationModel:
    return _build()


def _pretend_trained(adapted: AdaptedModel, seed: int = 3) -> None:
    """Move every trained tensor (zero-initialised ones included) as an optimiser would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("method", UNET_METHODS)
def test_round_trip_is_bit_exact_and_holds_only_trained_tensors(
    method: str, unet: FoundationModel, tmp_path
) -> None:
    adapted = apply_method(
        unet, method, ["spleen", "liver"], task="multiclass" if method == "lora" else "binary"
    )
    _pretend_trained(adapted)
    path = save_adapter(adapted, tmp_path / f"{method}.safetensors", record={"k": 1, "cases": ["a", "b"]})
    assert [p.name for p in tmp_path.iterdir()] == [f"{method}.safetensors"]  # atomic: no temporaries left
    stored = load_file(str(path))
    assert set(stored) == set(adapted.trainable_state_dict())
    assert sum(t.numel() for t in stored.values()) == adapted.num_trainable()  # unet-small: no running stats
    if method in ("zero-shot",):
        assert stored == {}
    if method in ("linear-probe", "bitfit", "lora"):  # no frozen weight is ever written
        assert not any(k.endswith("base_layer.weight") or k.startswith("base.head") for k in stored)

    loaded = load_adapter(path, unet)
    assert loaded.method_name == method and loaded.structures == ("spleen", "liver") and not loaded.training
    for k, v in adapted.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), adapted(x))


def test_header_records_what_rebuilds_the_adapter(unet: FoundationModel, tmp_path) -> None:
    adapted = apply_method(unet, "lora", ["Spleen"], config=LoRAConfig(rank=2, decoder="fine-tuned"))
    path = save_adapter(adapted, tmp_path / "a.safetensors", record={"support": ["case1"], "epochs": 3})
    header = read_adapter_header(path)
    assert header["format"] == "fseft-adapter" and header["version"] == 2
    assert header["size_priors"] == [] and header["transductive"] is None  # a plain adapter
    assert (
        header["method"] == "lora"
        and header["config"]["rank"] == 2
        and header["config"]["decoder"] == "fine-tuned"
    )
    assert header["structures"] == ["spleen"] and header["task"] == "binary"
    assert header["arch"] == "unet-small" and header["preprocess"]["roi"] == [32, 32, 32]
    assert (
        header["base_fingerprint"] == unet.fingerprint()
        and header["num_trainable"] == adapted.num_trainable()
    )
    assert header["record"] == {"support": ["case1"], "epochs": 3}
    assert load_adapter(path, unet).config == adapted.config
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        save_adapter(adapted, tmp_path / "b.safetensors", record={"bad": object()})
    assert not (tmp_path / "b.safetensors").exists()


def test_fingerprint_mismatch_is_refused(unet: FoundationModel, tmp_path) -> None:
    path = save_adapter(apply_method(unet, "linear-probe", ["liver"]), tmp_path / "lp.safetensors")
    other = _build(seed=1)
    with pytest.raises(
        CheckpointError,
        match=f"adapter .*lp.safetensors was trained on base model {unet.fingerprint()}, "
        f"this model is {other.fingerprint()}",
    ):
        load_adapter(path, other)


def test_unreadable_or_foreign_files_are_refused(unet: FoundationModel, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="adapter file not found"):
        read_adapter_header(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors adapter file"):
        load_adapter(junk, unet)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not an fseft adapter file"):
        load_adapter(plain, unet)
    # a header whose tensors do not match the method (edited or truncated file)
    good = save_adapter(apply_method(unet, "linear-probe", ["liver"]), tmp_path / "lp.safetensors")
    meta = {"fseft": json.dumps(read_adapter_header(good))}
    save_file({"head.weight": torch.zeros(1, 8, 1, 1, 1)}, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(
        CheckpointError, match=r"tensors do not match method 'linear-probe': missing \['head.bias'\]"
    ):
        load_adapter(tmp_path / "cut.safetensors", unet)


def test_training_buffers_travel_with_full_fine_tuning(tmp_path) -> None:
    model = _build("unet3d")
    adapted = apply_method(model, "full-ft", ["liver"])
    state = adapted.trainable_state_dict()
    assert "base.backbone.down_tr64.ops.0.bn1.running_mean" in state  # buffers of train-mode modules
    assert not any(k.startswith("base.head") for k in state)
    path = save_adapter(adapted, tmp_path / "ft.safetensors")
    assert set(load_file(str(path))) == set(state)


@pytest.mark.slow  # two SwinUNETR-12 forwards at 64^3
def test_swin_lora_round_trip(tmp_path) -> None:
    swin = _build("swinunetr", 12, 64)
    adapted = apply_method(swin, "lora", ["liver"])
    _pretend_trained(adapted)
    path = save_adapter(adapted, tmp_path / "lora.safetensors")
    stored = load_file(str(path))
    assert len([k for k in stored if ".lora_A." in k]) == 8  # one per Swin block's qkv
    loaded = load_adapter(path, swin)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), adapted(x))
