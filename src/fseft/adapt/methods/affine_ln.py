"""``affine-ln``: train the encoder's normalisation affine parameters and the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, register_method

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class AffineLNConfig(MethodConfig):
    """Affine-LN options: only the shared ones (decoder/bottleneck policy, lr)."""


@register_method
class AffineLN(AdaptMethod):
    """Scale and shift of every normalisation layer in the encoder (role ``norm``: SwinUNETR's
    LayerNorms; UNets' instance/batch norms), plus the head; lr 1e-2. The normalisation layers run in
    train mode while training (they train all their parameters), so batch norms use batch statistics
    and update their running statistics, which are then saved with the adapter."""

    name = "affine-ln"
    description = "encoder normalisation scale/shift + head"
    config_cls = AffineLNConfig
    paper_lr = 1e-2

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and encoder normalisation affine parameters.

        Raises:
            ConfigError: when the encoder's normalisation layers have no affine parameters.
        """
        affine = [
            p
            for m in encoder_part(model.base, "norm").values()
            for p in (getattr(m, "weight", None), getattr(m, "bias", None))
            if p is not None
        ]
        if not affine:
            raise ConfigError(
                f"affine-ln: the encoder norms of {model.base.config.arch!r} have no affine parameters"
            )
        return [*super().trainable(model), *affine]
