"""``spatial-adapter`` / ``spatial-adapter-1x1``: a residual convolutional adapter on the frozen decoder
features, then the head (black-box adapters, Silva-Rodríguez et al., MedIA 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, register_method
from .layers import ResidualConvAdapter

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class SpatialAdapterConfig(MethodConfig):
    """Spatial adapter options.

    Args:
        kernel_size: Odd cubic kernel of both adapter convolutions (3 = paper's spatial adapter).

    Raises:
        ConfigError: on an even or non-positive kernel size.
    """

    kernel_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd number, got {self.kernel_size}")


@dataclass(frozen=True)
class SpatialAdapter1x1Config(SpatialAdapterConfig):
    """As :class:`SpatialAdapterConfig`, with ``kernel_size`` 1 (a channel-only adapter)."""

    kernel_size: int = 1


@register_method
class SpatialAdapter(AdaptMethod):
    """``f + conv(relu(conv(f)))`` on the decoder features (``F`` channels kept, no bias, the second
    convolution zero-initialised so the model starts at the linear probe's zero-shot initialisation),
    then the head. Adapter and head both train: ``2 * F * F * k^3 + F * C + C`` parameters; lr 1e-4."""

    name = "spatial-adapter"
    description = "residual 3x3x3 conv adapter on frozen features + head"
    config_cls = SpatialAdapterConfig
    black_box = True
    paper_lr = 1e-4

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Set ``model.adapter`` to the residual convolutional adapter."""
        ref = model.head.weight
        k = self.config.kernel_size  # type: ignore[attr-defined]
        model.adapter = ResidualConvAdapter(model.base.feature_channels, k).to(ref.device, ref.dtype)
        return [model.adapter]

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and adapter."""
        return [*super().trainable(model), *model.adapter.parameters()]


@register_method
class SpatialAdapter1x1(SpatialAdapter):
    """The spatial adapter with ``1x1x1`` kernels: ``2 * F * F + F * C + C`` parameters."""

    name = "spatial-adapter-1x1"
    description = "residual 1x1x1 conv adapter on frozen features + head"
    config_cls = SpatialAdapter1x1Config
