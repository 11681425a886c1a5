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
    or of its convolutions (UNets: role ``conv`` inside the encoder; bias-free convolutions followed
    by a normalisation: that normalisation's bias), plus the head; lr 1e-2."""

    name = "bitfit"
    description = "encoder attention/MLP (UNet: conv) biases + head"
    config_cls = BitFitConfig
    paper_lr = 1e-2

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and encoder biases.

        A UNet whose encoder convolutions have no bias because a normalisation follows each of
        them (``resunet``) trains the normalisations' biases instead: they are the effective
        biases of those convolutions.

        Raises:
            ConfigError: when the encoder layers have no biases.
        """
        transformer = is_transformer(model.base)
        biases = self._biases(model, ("qkv", "proj", "mlp") if transformer else ("conv",))
        if not biases and not transformer:
            biases = self._biases(model, ("norm",))
        if not biases:
            raise ConfigError(f"bitfit: the encoder layers of {model.base.config.arch!r} have no bias terms")
        return [*super().trainable(model), *biases]

    @staticmethod
    def _biases(model: AdaptedModel, roles: tuple[str, ...]) -> list[nn.Parameter]:
        return [
            m.bias
            for r in roles
            for m in encoder_part(model.base, r).values()
            if getattr(m, "bias", None) is not None
        ]
