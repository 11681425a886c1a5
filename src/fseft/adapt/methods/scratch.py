"""``scratch``: train the whole network from random initialisation (the no-pre-training baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...models import FoundationModel
from .base import register_method, restart_head
from .full_ft import FullFT, FullFTConfig

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class ScratchConfig(FullFTConfig):
    """Options as :class:`FullFTConfig` (every weight is re-initialised anyway)."""


@register_method
class Scratch(FullFT):
    """As ``full-ft``, but every backbone weight is replaced by a fresh random initialisation (a newly
    built model of the same config, so parameters that have no ``reset_parameters``, such as Swin's
    relative position tables, are re-drawn too) and every head row starts absent; lr 1e-4."""

    name = "scratch"
    description = "same as full-ft from random initialisation"
    config_cls = ScratchConfig

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Re-initialise the base and the head in place; adds nothing."""
        fresh = FoundationModel(model.base.config)
        model.base.load_state_dict(fresh.state_dict())
        restart_head(model)
        return []
