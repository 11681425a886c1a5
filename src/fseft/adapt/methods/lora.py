"""``lora``: low-rank updates of the encoder's attention projections (Hu et al., ICLR 2022), via HF peft."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, is_transformer, register_method

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA options.

    Args:
        rank: Rank ``r`` of each update ``B A``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank`` (default 1).
        dropout: Dropout on the LoRA branch input.

    Raises:
        ConfigError: on a non-positive rank/alpha or a dropout outside ``[0, 1)``.
    """

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1 or not self.alpha > 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"lora needs rank >= 1, alpha > 0 and dropout in [0, 1), got {self.rank}, {self.alpha}, {self.dropout}"
            )


@register_method
class LoRA(AdaptMethod):
    """LoRA of rank 4 on every Swin block's ``qkv`` projection (role ``qkv``), or on the encoder
    convolutions of UNets (role ``conv`` inside the encoder; peft's ``Conv3d`` LoRA: ``A`` has the
    layer's kernel, ``B`` is ``1x1x1``), plus the head; lr 1e-3. ``B`` starts at zero (peft), so the
    adapted model starts as the base. Parameters: ``r * (in + out)`` per linear target
    (``r * (in * k^3 + out)`` per convolution)."""

    name = "lora"
    description = "rank-4 LoRA on encoder qkv (UNet: encoder convs) + head"
    config_cls = LoRAConfig
    paper_lr = 1e-3

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Inject peft LoRA layers into the target modules of ``model.base``."""
        import peft

        cfg: LoRAConfig = self.config  # type: ignore[assignment]
        names = list(encoder_part(model.base, "qkv" if is_transformer(model.base) else "conv"))
        peft_cfg = peft.LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names
        )
        peft.inject_adapter_in_model(peft_cfg, model.base)
        return [m for layer in _lora_layers(model) for m in (layer.lora_A, layer.lora_B, layer.lora_dropout)]

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and the LoRA factors ``A`` and ``B``."""
        lora = [
            p for layer in _lora_layers(model) for m in (layer.lora_A, layer.lora_B) for p in m.parameters()
        ]
        return [*super().trainable(model), *lora]


def _lora_layers(model: AdaptedModel) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.base.modules() if isinstance(m, LoraLayer)]
