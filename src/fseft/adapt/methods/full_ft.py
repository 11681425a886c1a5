"""``full-ft``: fine-tune the whole backbone and a new head (the paper's upper-cost baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, Policy, register_method


@dataclass(frozen=True)
class FullFTConfig(MethodConfig):
    """Full fine-tuning options: decoder and bottleneck train (``"fine-tuned"``, or ``"new"`` to
    re-initialise them first).

    Raises:
        ConfigError: when a policy is ``"frozen"``.
    """

    decoder: Policy = "fine-tuned"
    bottleneck: Policy = "fine-tuned"

    def __post_init__(self) -> None:
        super().__post_init__()
        if "frozen" in (self.decoder, self.bottleneck):
            raise ConfigError(
                "full fine-tuning trains everything: decoder/bottleneck must be 'fine-tuned' or 'new'"
            )


@register_method
class FullFT(AdaptMethod):
    """Every backbone parameter (roles ``encoder``, ``bottleneck``, ``decoder``) and the new head
    (zero-shot initialised) train, with the whole backbone in train mode; lr 1e-4."""

    name = "full-ft"
    description = "fine-tune the whole backbone + head"
    config_cls = FullFTConfig
    paper_lr = 1e-4
    trains_encoder = True
