"""``adapter-cnn``: parallel 1x1x1 convolutions beside the UNet encoder's convolutions (residual
adapters of Rebuffi et al., CVPR 2018, parallel form).

Differs from the reference code's AdapterCNN (jusiro/fewshot-finetuning,
``fseft/modeling/peft/AdapterCNN.py``) in two ways: there the ``1x1x1`` convolutions keep PyTorch's
default (random) initialisation, so the adapted model does not start as the base, and they also sit
beside the deepest contracting block (``down_tr512``, fseft's bottleneck); here they start at zero
and cover the encoder role only. Results of this method are therefore not the paper's AdapterCNN rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, register_method
from .layers import SideAdapter, attach_side_adapter, side_adapter_parameters

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class AdapterCNNConfig(MethodConfig):
    """Adapter-CNN options.

    Args:
        scale: Multiplier of the adapter outputs.
    """

    scale: float = 1.0


@register_method
class AdapterCNN(AdaptMethod):
    """``conv(x) + s * conv1x1(x)`` for every encoder convolution (role ``conv`` inside the encoder),
    the ``1x1x1`` convolution with the host's stride, no bias, zero-initialised (the model starts as
    the base). Parameters: ``in * out`` per convolution, plus the head; lr 1e-2."""

    name = "adapter-cnn"
    description = "parallel zero-init 1x1x1 convs beside UNet encoder convs + head (reference: random init, + bottleneck)"
    config_cls = AdapterCNNConfig
    paper_lr = 1e-2
    backbones = ("unet3d", "unet-small", "resunet")

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Attach one parallel ``1x1x1`` convolution to each encoder convolution.

        Raises:
            ConfigError: for grouped convolutions.
        """
        added: list[nn.Module] = []
        for name, conv in encoder_part(model.base, "conv").items():
            if conv.groups != 1:
                raise ConfigError(f"adapter-cnn: grouped convolution {name} is not supported")
            side_conv = nn.Conv3d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)
            nn.init.zeros_(side_conv.weight)
            side = SideAdapter(side_conv, self.config.scale, "input")  # type: ignore[attr-defined]
            added.append(attach_side_adapter(conv, side.to(conv.weight.device, conv.weight.dtype)))
        return added

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and side convolutions."""
        return [*super().trainable(model), *side_adapter_parameters(model.base)]
