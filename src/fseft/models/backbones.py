"""Backbone registry: each backbone maps an image to its last decoder feature map and names its parts.

A backbone's *role map* groups its modules by what adaptation methods act on (``encoder``,
``bottleneck``, ``decoder``; Swin: ``qkv``, ``proj``, ``mlp``, ``norm``; UNets: ``conv``, ``norm``),
found structurally (by attribute access on the network), never by searching parameter names.
Module names in a role map are relative to the backbone module.

SwinUNETR and the small UNet wrap MONAI networks (their output layers replaced by ``Identity``, so
calling the network returns the final decoder features); ``unet3d`` is the public SuPreM layout
(:mod:`fseft.models.unet3d`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .config import ModelConfig
from .resunet import ResUNet
from .swin_merging import SWIN_MERGINGS
from .unet3d import UNet3D

#: role name -> {module name relative to the backbone: module}
RoleMap = dict[str, dict[str, nn.Module]]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its parts are.

    Args:
        name: Registry name (``ModelConfig.arch``).
        description: One line for listings.
        build: ``ModelConfig -> nn.Module`` whose forward returns ``[B, F, *spatial]`` features.
        out_channels: ``ModelConfig -> F``.
        roles: ``backbone module -> RoleMap``.
        divisor: Every input side must be a multiple of this.
        min_size: Every input side must be at least this.
        check: Extra ``ModelConfig`` validation (raises :class:`ConfigError`).
    """

    name: str
    description: str
    build: Callable[[ModelConfig], nn.Module]
    out_channels: Callable[[ModelConfig], int]
    roles: Callable[[nn.Module], RoleMap]
    divisor: int
    min_size: int
    check: Callable[[ModelConfig], None]

    def check_shape(self, shape: Sequence[int], what: str = "input") -> None:
        """Validate spatial sizes for this backbone.

        Raises:
            ConfigError: naming the backbone, the sizes and the rule when a side is illegal.
        """
        bad = [int(s) for s in shape if int(s) < self.min_size or int(s) % self.divisor]
        if len(shape) != 3 or bad:
            raise ConfigError(
                f"{what} size {tuple(int(s) for s in shape)} is invalid for backbone {self.name!r}: "
                f"need 3 sides, each a multiple of {self.divisor} and at least {self.min_size}"
            )


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _named(root: nn.Module, modules: Iterable[nn.Module]) -> dict[str, nn.Module]:
    """Name structurally selected modules by their path under ``root`` (keeps selection order)."""
    names = {id(m): n for n, m in root.named_modules()}
    return {names[id(m)]: m for m in modules}


def _children(root: nn.Module, attrs: Iterable[str]) -> dict[str, nn.Module]:
    return {a: getattr(root, a) for a in attrs}


def _of_type(root: nn.Module, groups: Iterable[nn.Module], kinds: tuple[type, ...]) -> dict[str, nn.Module]:
    return _named(root, (m for g in groups for m in g.modules() if isinstance(m, kinds)))


# --- SwinUNETR (MONAI) -------------------------------------------------------------------------------


def _swin_check(cfg: ModelConfig) -> None:
    if cfg.feature_size % 12:
        raise ConfigError(
            f"swinunetr feature_size must be a multiple of 12 (48 = paper), got {cfg.feature_size}"
        )


def _swin_build(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(
        in_channels=cfg.in_channels,
        out_channels=1,
        feature_size=cfg.feature_size,
        drop_rate=cfg.dropout,
        use_checkpoint=cfg.use_checkpoint,
        downsample=SWIN_MERGINGS[cfg.swin_merging],
    )
    net.out = nn.Identity()  # the universal head replaces MONAI's output block
    return net


def _swin_roles(net: nn.Module) -> RoleMap:
    vit = net.swinViT
    layers = [getattr(vit, f"layers{i}")[0] for i in range(1, 5)]
    blocks = [b for layer in layers for b in layer.blocks]
    norms: list[nn.Module] = []
    for layer in layers:
        norms += [m for b in layer.blocks for m in (b.norm1, b.norm2)]
        if layer.downsample is not None:
            norms.append(layer.downsample.norm)
    return {
        "encoder": _children(net, ["swinViT"]),
        "bottleneck": _children(net, ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"]),
        "decoder": _children(net, ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1"]),
        "qkv": _named(net, (b.attn.qkv for b in blocks)),
        "proj": _named(net, (b.attn.proj for b in blocks)),
        "mlp": _named(net, (lin for b in blocks for lin in (b.mlp.linear1, b.mlp.linear2))),
        "ffn": _named(net, (b.mlp for b in blocks)),  # whole MLP blocks (AdaptFormer/Compacter hosts)
        "norm": _named(net, norms),
    }


BACKBONES.add(
    "swinunetr",
    BackboneSpec(
        name="swinunetr",
        description="MONAI SwinUNETR (Hatamizadeh et al. 2022); feature_size 48 = paper, 12 for CPU tests",
        build=_swin_build,
        out_channels=lambda cfg: cfg.feature_size,
        roles=_swin_roles,
        divisor=32,
        min_size=64,
        check=_swin_check,
    ),
)


# --- UNet3D (public SuPreM / CLIP-Driven layout) ----------------------------------------------------

_UNET3D_ENCODER = ["down_tr64", "down_tr128", "down_tr256"]


def _unet3d_check(cfg: ModelConfig) -> None:
    if cfg.feature_size % 2:
        raise ConfigError(
            f"unet3d feature_size must be even (64 = public SuPreM layout), got {cfg.feature_size}"
        )


def _unet3d_roles(net: nn.Module) -> RoleMap:
    contracting = [getattr(net, a) for a in [*_UNET3D_ENCODER, "down_tr512"]]
    return {
        "encoder": _children(net, _UNET3D_ENCODER),
        "bottleneck": _children(net, ["down_tr512"]),
        "decoder": _children(net, ["up_tr256", "up_tr128", "up_tr64"]),
        "conv": _of_type(net, contracting, (nn.Conv3d,)),
        "norm": _of_type(net, contracting, (nn.BatchNorm3d,)),
    }


BACKBONES.add(
    "unet3d",
    BackboneSpec(
        name="unet3d",
        description="3D UNet of Models Genesis / CLIP-Driven / SuPreM (19.1 M parameters at feature_size 64)",
        build=lambda cfg: UNet3D(in_channels=cfg.in_channels, base=cfg.feature_size // 2),
        out_channels=lambda cfg: cfg.feature_size,
        roles=_unet3d_roles,
        divisor=8,
        min_size=8,
        check=_unet3d_check,
    ),
)


# --- small UNet (MONAI BasicUNet) for CPU ------------------------------------------------------------

_SMALL_ENCODER = ["conv_0", "down_1", "down_2", "down_3"]


def _small_build(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import BasicUNet

    f = cfg.feature_size
    net = BasicUNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=1,
        features=(f, f, 2 * f, 4 * f, 8 * f, f),
        dropout=cfg.dropout,
    )
    net.final_conv = nn.Identity()  # the universal head replaces MONAI's output convolution
    return net


def _small_roles(net: nn.Module) -> RoleMap:
    contracting = [getattr(net, a) for a in [*_SMALL_ENCODER, "down_4"]]
    return {
        "encoder": _children(net, _SMALL_ENCODER),
        "bottleneck": _children(net, ["down_4"]),
        "decoder": _children(net, ["upcat_4", "upcat_3", "upcat_2", "upcat_1"]),
        "conv": _of_type(net, contracting, (nn.Conv3d,)),
        "norm": _of_type(net, contracting, (nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm)),
    }


BACKBONES.add(
    "unet-small",
    BackboneSpec(
        name="unet-small",
        description="MONAI BasicUNet, widths (f, f, 2f, 4f, 8f, f); 1.4 M parameters at feature_size 16 (CPU)",
        build=_small_build,
        out_channels=lambda cfg: cfg.feature_size,
        roles=_small_roles,
        divisor=16,
        min_size=16,
        check=lambda cfg: None,
    ),
)


# --- residual UNet with a strided stem (CPU-efficient, MONAI nnU-Net blocks) ---------------------------


def _resunet_roles(net: nn.Module) -> RoleMap:
    encoder = {"stem": net.stem, **{f"down.{i}": net.down[i] for i in range(3)}}
    contracting = [net.stem, *net.down]
    return {
        "encoder": encoder,
        "bottleneck": {"down.3": net.down[3]},
        "decoder": {**{f"up.{i}": net.up[i] for i in range(3)}, "out_up": net.out_up, "out_fuse": net.out_fuse},
        "conv": _of_type(net, contracting, (nn.Conv3d,)),
        "norm": _of_type(net, contracting, (nn.InstanceNorm3d,)),
    }


BACKBONES.add(
    "resunet",
    BackboneSpec(
        name="resunet",
        description="residual UNet, strided stem, widths (f | 2f, 4f, 8f | 16f); 1.4 M parameters at "
        "feature_size 8 (CPU pre-training)",
        build=lambda cfg: ResUNet(cfg.in_channels, cfg.feature_size, cfg.dropout),
        out_channels=lambda cfg: cfg.feature_size,
        roles=_resunet_roles,
        divisor=16,
        min_size=16,
        check=lambda cfg: None,
    ),
)


def get_backbone(arch: str) -> BackboneSpec:
    """The registered backbone ``arch``.

    Raises:
        ConfigError: listing the registered backbones when ``arch`` is unknown.
    """
    return BACKBONES.get(arch)
