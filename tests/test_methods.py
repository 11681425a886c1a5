"""Adaptation methods: registry, trainable sets and counts, gradients, train modes, zero-init, policies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fseft.adapt import AdaptedModel, apply_method, get_method, list_methods
from fseft.adapt.methods.lora import LoRAConfig
from fseft.config import PreprocessConfig
from fseft.errors import ConfigError
from fseft.models import FoundationModel, ModelConfig, build_model
from fseft.models.foundation import HEAD_PRIOR, HEAD_PRIOR_BIAS

STRUCTS = ("liver", "kidney_right", "spleen")
TARGETS = ("spleen", "liver")  # both known to the base, in another order than its head
ALL = {
    "zero-shot", "linear-probe", "spatial-adapter", "spatial-adapter-1x1", "bitfit", "affine-ln", "lora",
    "adaptformer", "compacter", "adapter-cnn", "full-ft", "scratch",
}  # fmt: skip
SWIN_ONLY, UNET_ONLY = {"adaptformer", "compacter"}, {"adapter-cnn"}
ZERO_INIT_PEFT = ["spatial-adapter", "lora", "adaptformer", "compacter", "adapter-cnn"]


def _build(arch: str, feature_size: int, roi: int, seed: int = 0) -> FoundationModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch, feature_size=feature_size, structures=STRUCTS, preprocess=PreprocessConfig(roi=(roi,) * 3)
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def unet() -> FoundationModel:
    return _build("unet-small", 8, 32)


@pytest.fixture(scope="module")
def resunet() -> FoundationModel:
    return _build("resunet", 4, 32)


@pytest.fixture(scope="module")
def swin() -> FoundationModel:
    return _build("swinunetr", 12, 64)


@pytest.fixture(scope="module")
def unet_io(unet: FoundationModel) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        return x, unet(x)


@pytest.fixture(scope="module")
def swin_io(swin: FoundationModel) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        return x, swin(x)


def expected_count(method: str, model: FoundationModel, n_out: int) -> int:
    """Closed-form trainable-parameter counts (unet-small widths (f, f, 2f, 4f, 8f); Swin dims F..8F)."""
    f = model.feature_channels
    head = f * n_out + n_out
    if method == "zero-shot":
        return 0
    if method in ("full-ft", "scratch"):
        return sum(p.numel() for p in model.backbone.parameters()) + head
    per_method: dict[str, int] = {
        "linear-probe": 0,
        "spatial-adapter": 2 * f * f * 27,
        "spatial-adapter-1x1": 2 * f * f,
    }
    if model.config.arch == "swinunetr":
        dims = [f, 2 * f, 4 * f, 8 * f]  # two blocks per stage
        per_method |= {
            "bitfit": sum(2 * (3 * d + d + 4 * d + d) for d in dims),  # qkv, proj, mlp.linear1/2 biases
            "affine-ln": sum(
                2 * (2 * d + 2 * d) + 2 * 8 * d for d in dims
            ),  # norm1/norm2, patch-merging norm
            "lora": sum(2 * 4 * (d + 3 * d) for d in dims),  # rank 4 on qkv: r * (in + out)
            "adaptformer": sum(2 * (2 * d * 16 + 16 + d) for d in dims),
            "compacter": sum(2 * 3 * (d + 16) for d in dims) + 2 * 4**3,
        }
    elif model.config.arch == "resunet":
        # (in, out, kernel) of the encoder convolutions: the stem, then per residual block conv1
        # (stride 2), conv2 and the 1x1x1 projection of the skip; every one followed by an affine
        # instance norm (BitFit trains those biases: the convolutions have none)
        convs3 = [(1, f, 3)] + [c for i, o in ((f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f))
                                for c in ((i, o, 3), (o, o, 3), (i, o, 1))]  # fmt: skip
        per_method |= {
            "bitfit": sum(o for _, o, _ in convs3),
            "affine-ln": sum(2 * o for _, o, _ in convs3),
            "lora": sum(4 * i * k**3 + 4 * o for i, o, k in convs3),
            "adapter-cnn": sum(i * o for i, o, _ in convs3),
        }
    else:
        convs = [(1, f), (f, f), (f, f), (f, f), (f, 2 * f), (2 * f, 2 * f), (2 * f, 4 * f), (4 * f, 4 * f)]
        per_method |= {
            "bitfit": sum(o for _, o in convs),
            "affine-ln": sum(2 * o for _, o in convs),
            "lora": sum(4 * i * 27 + 4 * o for i, o in convs),
            "adapter-cnn": sum(i * o for i, o in convs),
        }
    return per_method[method] + head


def test_registry_lists_every_method_and_rejects_unknown_names() -> None:
    assert set(list_methods()) == ALL
    with pytest.raises(ConfigError, match="unknown adaptation method 'lorra'; choose one of: .*lora"):
        get_method("lorra")
    for name in ALL:
        cls = get_method(name)
        assert cls.name == name and cls.description and dataclasses.is_dataclass(cls.config_cls)


@pytest.mark.parametrize("method", sorted(ALL))
@pytest.mark.parametrize("arch", ["unet-small", "resunet", "swinunetr"])
def test_trainable_count_matches_formula(
    arch: str, method: str, unet: FoundationModel, resunet: FoundationModel, swin: FoundationModel
) -> None:
    model = {"swinunetr": swin, "resunet": resunet, "unet-small": unet}[arch]
    if method in (UNET_ONLY if arch == "swinunetr" else SWIN_ONLY):
        supported = "unet3d, unet-small, resunet" if arch == "swinunetr" else "swinunetr"
        with pytest.raises(
            ConfigError, match=f"does not apply to backbone '{arch}'; it supports: {supported}"
        ):
            apply_method(model, method, TARGETS)
        return
    adapted = apply_method(model, method, TARGETS)
    assert adapted.num_trainable() == expected_count(method, model, len(TARGETS))
    assert adapted.black_box == (
        method in ("zero-shot", "linear-probe", "spatial-adapter", "spatial-adapter-1x1")
    )
    # only the method's parameters are trainable: the base's universal head never is
    assert not any(p.requires_grad for p in adapted.base.head.parameters())


def test_apply_method_leaves_the_callers_model_untouched(unet: FoundationModel) -> None:
    before, keys = unet.fingerprint(), list(unet.state_dict())
    for method in ("lora", "adapter-cnn", "scratch"):
        adapted = apply_method(unet, method, TARGETS)
        assert adapted.base is not unet and adapted.base_fingerprint == before
    assert unet.fingerprint() == before and list(unet.state_dict()) == keys
    assert all(p.requires_grad for p in unet.parameters())


def _check_train_modes(adapted: AdaptedModel, method: str) -> None:
    """Frozen parts stay in eval mode under train(); what trains runs in train mode."""
    base = adapted.base
    assert adapted.head.training == (method != "zero-shot")
    decoder = [m for g in base.role("decoder").values() for m in g.modules()]
    encoder_norms = [m for n, m in base.role("norm").items() if n in _in_encoder(base)]
    dropouts = [
        m
        for g in base.role("encoder").values()
        for m in g.modules()
        if isinstance(m, nn.modules.dropout._DropoutNd)
    ]
    if method in ("full-ft", "scratch"):
        groups = ("encoder", "bottleneck", "decoder")
        assert all(m.training for r in groups for g in base.role(r).values() for m in g.modules())
        return
    assert not any(m.training for m in decoder)  # decoder frozen by default
    assert not any(m.training for m in dropouts)  # frozen encoder dropout stays off
    assert all(m.training == (method == "affine-ln") for m in encoder_norms)


def _in_encoder(base: FoundationModel) -> set[str]:
    names = {n for n, _ in base.named_modules()}
    enc = list(base.role("encoder"))
    return {n for n in names if any(n == e or n.startswith(e + ".") for e in enc)}


@pytest.mark.parametrize("method", sorted(ALL - SWIN_ONLY))
def test_unet_gradients_train_modes_and_initial_output(
    method: str, unet: FoundationModel, unet_io: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, base_out = unet_io
    adapted = apply_method(unet, method, TARGETS)
    rows = [STRUCTS.index(s) for s in TARGETS]
    with torch.no_grad():
        out = adapted(x)
    assert out.shape == (1, len(TARGETS), 32, 32, 32)
    if method == "scratch":
        assert not torch.allclose(out, base_out[:, rows], atol=1e-3)
    else:  # zero-shot head rows, zero-initialised adapters: the adapted model starts as the base
        torch.testing.assert_close(out, base_out[:, rows], rtol=1e-5, atol=1e-5)
    adapted.train()
    _check_train_modes(adapted, method)
    y = adapted(x)
    if method == "zero-shot":
        assert not y.requires_grad and adapted.num_trainable() == 0
        return
    y.square().mean().backward()
    for name, p in adapted.named_parameters():
        assert (p.grad is None) != p.requires_grad, name
    head_grad = adapted.head.weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    adapted.eval()
    assert not any(m.training for m in adapted.modules())


@pytest.mark.slow  # one SwinUNETR-12 forward + backward per method (64^3)
@pytest.mark.parametrize("method", ["lora", "adaptformer", "compacter"])
def test_swin_peft_gradients_and_zero_init(
    method: str, swin: FoundationModel, swin_io: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, base_out = swin_io
    adapted = apply_method(swin, method, ["liver"]).train()
    _check_train_modes(adapted, method)
    y = adapted(x)
    torch.testing.assert_close(y.detach(), base_out[:, :1], rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    for name, p in adapted.named_parameters():
        assert (p.grad is None) != p.requires_grad, name
    # the method's own parameters are reached by the loss (LoRA's A only once B moves, so check B)
    added = [p for n, p in adapted.trainable_parameters().items() if not n.startswith("head.")]
    assert sum(float(p.grad.abs().sum()) for p in added) > 0


def test_decoder_policies(unet: FoundationModel, unet_io: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = unet_io
    cls = get_method("linear-probe")
    base_dec = {n: p.clone() for g in unet.role("decoder").values() for n, p in g.named_parameters()}

    def decoder(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        return {n: p for g in adapted.base.role("decoder").values() for n, p in g.named_parameters()}

    new = apply_method(unet, "linear-probe", TARGETS, config=cls.config_cls(decoder="new"))
    assert any(not torch.equal(p, base_dec[n]) for n, p in decoder(new).items())
    assert all(p.requires_grad for p in decoder(new).values()) and not new.black_box and new.lr == 1e-4
    zero_shot_rows = torch.stack([unet.head_row(s)[0] for s in TARGETS])
    assert not new.head.weight.any() and torch.allclose(new.head.bias.detach(), torch.tensor(HEAD_PRIOR_BIAS))
    assert not torch.equal(new.head.weight[:, :, 0, 0, 0], zero_shot_rows)  # a new decoder: every row absent
    tuned = apply_method(unet, "linear-probe", TARGETS, config=cls.config_cls(decoder="fine-tuned"))
    assert torch.equal(tuned.head.weight[:, :, 0, 0, 0], zero_shot_rows)  # fine-tuned keeps the zero-shot head
    assert all(torch.equal(p, base_dec[n]) and p.requires_grad for n, p in decoder(tuned).items())
    tuned.train()
    assert all(m.training for g in tuned.base.role("decoder").values() for m in g.modules())
    frozen = apply_method(unet, "linear-probe", TARGETS).train()
    frozen(x).mean().backward()
    assert all(p.grad is None for p in decoder(frozen).values()) and frozen.black_box and frozen.lr == 1e-2
    bottleneck = apply_method(
        unet, "bitfit", TARGETS, config=get_method("bitfit").config_cls(bottleneck="fine-tuned")
    )
    assert bottleneck.num_trainable() == expected_count("bitfit", unet, 2) + sum(
        p.numel() for g in unet.role("bottleneck").values() for p in g.parameters()
    )


def test_heads_zero_shot_init_novel_rows_and_multiclass(unet: FoundationModel) -> None:
    lp = apply_method(unet, "linear-probe", ["spleen", "gallbladder"])
    w, b = unet.head_row("spleen")
    torch.testing.assert_close(lp.head.weight[0, :, 0, 0, 0], w)
    f = torch.randn(1, unet.feature_channels, 4, 4, 4)
    for seed in (0, 1):  # the novel row starts absent whatever the seed (a Xavier row is a lottery)
        torch.manual_seed(seed)
        lp = apply_method(unet, "linear-probe", ["spleen", "gallbladder"])
        assert not lp.head.weight[1].any() and float(lp.head.bias[1].detach()) == pytest.approx(HEAD_PRIOR_BIAS)
        probs = torch.sigmoid(lp.forward_features(f)[:, 1]).detach()
        torch.testing.assert_close(probs, torch.full_like(probs, HEAD_PRIOR))
    mc = apply_method(unet, "zero-shot", ["liver"], task="multiclass")
    assert mc.head.out_channels == 2 and mc.head.weight[0].abs().sum() == 0 and mc.head.bias[0] == 0
    probs = torch.softmax(mc.forward_features(f), dim=1)[:, 1:]
    torch.testing.assert_close(probs, torch.sigmoid(unet.head(f)[:, :1]))  # softmax([0, l]) = sigmoid(l)
    with pytest.raises(ConfigError, match="task must be one of binary, multiclass"):
        apply_method(unet, "linear-probe", ["liver"], task="softmax")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\['liver'\] more than once"):
        apply_method(unet, "linear-probe", ["liver", "Liver"])


def test_zero_shot_refuses_unknown_structure_naming_known_ones(unet: FoundationModel) -> None:
    with pytest.raises(
        ConfigError, match="'gallbladder' is not in this model's head; known: liver, kidney_right, spleen"
    ):
        apply_method(unet, "zero-shot", ["liver", "gallbladder"])


def test_configs_and_learning_rates(unet: FoundationModel) -> None:
    lora = get_method("lora")
    assert lora.default_lr(LoRAConfig()) == 1e-3 and lora.default_lr(LoRAConfig(decoder="fine-tuned")) == 1e-4
    assert apply_method(unet, "lora", ["liver"], config=LoRAConfig(lr=5e-3)).lr == 5e-3
    assert get_method("zero-shot").default_lr(get_method("zero-shot").config_cls()) is None
    with pytest.raises(ConfigError, match="zero-shot trains nothing"):
        get_method("zero-shot").config_cls(decoder="fine-tuned")
    with pytest.raises(ConfigError, match="must be 'fine-tuned' or 'new'"):
        get_method("full-ft").config_cls(decoder="frozen")
    with pytest.raises(ConfigError, match="decoder policy must be one of frozen, fine-tuned, new"):
        LoRAConfig(decoder="unfrozen")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="takes a LoRAConfig, got BitFitConfig"):
        apply_method(unet, "lora", ["liver"], config=get_method("bitfit").config_cls())
    r8 = apply_method(unet, "lora", ["liver"], config=LoRAConfig(rank=8))
    assert r8.num_trainable() - expected_count("linear-probe", unet, 1) == 2 * (
        expected_count("lora", unet, 1) - expected_count("linear-probe", unet, 1)
    )


def test_unet3d_batch_norms_train_under_affine_ln_and_counts() -> None:
    model = _build("unet3d", 8, 32)
    adapted = apply_method(model, "affine-ln", ["liver"]).train()
    enc_norms = [m for n, m in model.role("norm").items() if n in _in_encoder(model)]
    assert enc_norms and all(isinstance(m, nn.BatchNorm3d) for m in enc_norms)
    assert all(
        adapted.get_submodule(f"base.{n}").training for n in model.role("norm") if n in _in_encoder(model)
    )
    assert adapted.num_trainable() == sum(2 * m.num_features for m in enc_norms) + 8 + 1
    cnn = apply_method(model, "adapter-cnn", ["liver"])
    enc_convs = [m for n, m in model.role("conv").items() if n in _in_encoder(model)]
    assert cnn.num_trainable() == sum(c.in_channels * c.out_channels for c in enc_convs) + 8 + 1


def test_methods_command_lists_every_method_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    from fseft.cli import main

    assert (
        main(["methods", "--arch", "unet-small", "--feature-size", "8", "--structures", "liver,spleen"]) == 0
    )
    out = capsys.readouterr().out
    cells = {
        line.split()[0]: line.split()[:4]
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0] in ALL
    }
    assert set(cells) == ALL
    assert cells["linear-probe"] == ["linear-probe", "0.01", "yes", "18"]  # F * C + C = 8 * 2 + 2
    assert cells["zero-shot"] == ["zero-shot", "-", "yes", "0"]
    assert cells["lora"] == ["lora", "0.001", "no", "11,006"]
    assert cells["adaptformer"][3] == "n/a" and "it supports: swinunetr" in " ".join(out.split())
    assert main(["methods", "--arch", "resnet"]) == 2
    assert "fseft: error: unknown backbone 'resnet'" in capsys.readouterr().err
