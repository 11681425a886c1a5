"""``lora``: low-rank updates of the encoder's attention projections (Hu et al., ICLR 2022), via HF peft.

Two variants (``LoRAConfig.variant``):

- ``"reference"`` follows the reference code (jusiro/fewshot-finetuning,
  ``fseft/modeling/peft/LoRA.py``) exactly: on every Swin block's fused ``qkv`` projection
  (``C -> 3C``) one update ``B A`` with ``A: C -> 3r`` (``r`` per projection: ``3r = 12`` in all for
  ``r = 4``) and ``B: 3r -> 3C``, no bias, ``A`` with PyTorch's default Linear initialisation and
  ``B`` zero, scale 1 (``alpha = rank``), nothing else in the encoder trains. Parameters per block:
  ``3r * C + 3r * 3C = 12 r C``. SwinUNETR only, as in the reference. The paper protocols use it.
- ``"fused"`` (the default; fseft's lighter variant): one rank-``r`` update per fused ``qkv``
  (``4 r C`` per block), and on UNets the encoder convolutions (the reference has no UNet LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, is_transformer, register_method

if TYPE_CHECKING:
    from ..model import AdaptedModel

LORA_VARIANTS: tuple[str, ...] = ("fused", "reference")


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA options.

    Args:
        rank: ``"fused"``: rank ``r`` of each update ``B A``; ``"reference"``: rank per projection
            (q, k, v), so the fused update has rank ``3 r``.
        alpha: The update is scaled by ``alpha / rank`` (default 1, the reference's).
        dropout: Dropout on the LoRA branch input.
        variant: ``"fused"`` or ``"reference"`` (module doc).

    Raises:
        ConfigError: on a non-positive rank/alpha, a dropout outside ``[0, 1)`` or an unknown variant.
    """

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    variant: str = "fused"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in LORA_VARIANTS:
            raise ConfigError(f"lora variant must be one of {', '.join(LORA_VARIANTS)}, got {self.variant!r}")
        if self.rank < 1 or not self.alpha > 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"lora needs rank >= 1, alpha > 0 and dropout in [0, 1), got {self.rank}, {self.alpha}, {self.dropout}"
            )


@register_method
class LoRA(AdaptMethod):
    """LoRA on every Swin block's ``qkv`` projection (role ``qkv``), or (``"fused"`` only) on the
    encoder convolutions of UNets (role ``conv`` inside the encoder; peft's ``Conv3d`` LoRA: ``A`` has
    the layer's kernel, ``B`` is ``1x1x1``), plus the head; lr 1e-3 (the reference's). ``B`` starts at
    zero, so the adapted model starts as the base. Parameters: ``r' * (in + out)`` per linear target
    with ``r' = r`` (``"fused"``) or ``3 r`` (``"reference"``); ``r * (in * k^3 + out)`` per
    convolution."""

    name = "lora"
    description = "rank-4 LoRA on encoder qkv (UNet: encoder convs) + head; variant reference: rank 4 per q, k, v"
    config_cls = LoRAConfig
    paper_lr = 1e-3

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Inject peft LoRA layers into the target modules of ``model.base``."""
        import peft

        cfg: LoRAConfig = self.config  # type: ignore[assignment]
        transformer = is_transformer(model.base)
        if cfg.variant == "reference" and not transformer:
            raise ConfigError(
                f"lora variant 'reference' is for SwinUNETR (the reference has no UNet LoRA); "
                f"{model.base.config.arch} takes variant 'fused'"
            )
        names = list(encoder_part(model.base, "qkv" if transformer else "conv"))
        per = 3 if cfg.variant == "reference" else 1  # reference: rank r for each of q, k, v, fused
        peft_cfg = peft.LoraConfig(
            r=per * cfg.rank, lora_alpha=per * cfg.alpha, lora_dropout=cfg.dropout, target_modules=names
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
