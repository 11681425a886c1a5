"""``zero-shot``: the foundation model's own head rows for the target structures, nothing trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, register_method

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    """Zero-shot takes no options: decoder and bottleneck must stay frozen and ``lr`` unset.

    Raises:
        ConfigError: when a policy is not ``"frozen"`` or ``lr`` is set.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trains_backbone_groups or self.lr is not None:
            raise ConfigError("zero-shot trains nothing: decoder/bottleneck must be 'frozen' and lr unset")


@register_method
class ZeroShot(AdaptMethod):
    """The pre-trained universal head restricted to the target structures (Silva-Rodríguez et al.,
    MedIA 2025: the foundation model used as is). The head is a copy of the base's rows; for
    multi-class tasks a zero background row is added (``softmax([0, l]) = sigmoid(l)``)."""

    name = "zero-shot"
    description = "pre-trained head rows of known structures, no training"
    config_cls = ZeroShotConfig
    black_box = True
    paper_lr = None

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Check that the base has a trained head row for every target structure; adds nothing.

        Raises:
            ConfigError: naming the structures the model knows, or the structures whose head row
                was never trained (a checkpoint without a head).
        """
        for s in model.structures:
            model.base.structure_index(s)
        untrained = [s for s in model.structures if s in model.base.untrained_head_rows]
        if untrained:
            raise ConfigError(
                f"zero-shot needs a trained head row, and this model has none for {', '.join(untrained)} "
                "(its checkpoint has no head for them): adapt with a training method, e.g. linear-probe"
            )
        return []

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Nothing trains."""
        return []
