"""``bitfit``: train the encoder's bias terms and the head (Ben Zaken et al., ACL 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, is_transformer, register_method

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """BitFit options: only the shared ones (decoder/bottleneck policy, lr)."""


@register_method
class BitFit(AdaptMethod):
    """Biases of the encoder's attention and MLP layers (SwinUNETR roles ``qkv``, ``proj``, ``mlp``)
    or of its convolutions (UNets: role ``conv`` inside the encoder), plus the head; lr 1e-2."""

    name = "bitfit"
    description = "encoder attention/MLP (UNet: conv) biases + head"
    config_cls = BitFitConfig
    paper_lr = 1e-2

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and encoder biases.

        Raises:
            ConfigError: when the encoder layers have no biases.
        """
        roles = ("qkv", "proj", "mlp") if is_transformer(model.base) else ("conv",)
        biases = [
            m.bias
            for r in roles
            for m in encoder_part(model.base, r).values()
            if getattr(m, "bias", None) is not None
        ]
        if not biases:
            raise ConfigError(f"bitfit: the encoder layers of {model.base.config.arch!r} have no bias terms")
        return [*super().trainable(model), *biases]
