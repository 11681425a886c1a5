"""``adaptformer``: a bottleneck MLP beside every Swin block's MLP (Chen et al., NeurIPS 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, register_method
from .layers import SideAdapter, attach_side_adapter, bottleneck_mlp, mlp_dims, side_adapter_parameters

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass(frozen=True)
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer options.

    Args:
        hidden: Width of the adapter's bottleneck (16).
        scale: Multiplier ``s`` of the adapter output (0.1).

    Raises:
        ConfigError: on a non-positive width.
    """

    hidden: int = 16
    scale: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1:
            raise ConfigError(f"adaptformer hidden width must be >= 1, got {self.hidden}")


@register_method
class AdaptFormer(AdaptMethod):
    """``mlp(x) + s * up(relu(down(x)))`` for every Swin block's MLP (role ``ffn``): ``down`` is
    ``Linear(d, hidden)``, ``up`` is ``Linear(hidden, d)`` zero-initialised (the model starts as the
    base), ``s = 0.1``. Adapters and head train: ``2 * d * hidden + hidden + d`` per block; lr 1e-2."""

    name = "adaptformer"
    description = "parallel bottleneck MLP adapter beside each Swin MLP + head"
    config_cls = AdaptFormerConfig
    paper_lr = 1e-2
    backbones = ("swinunetr",)

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Attach one parallel adapter to each encoder MLP block."""
        cfg: AdaptFormerConfig = self.config  # type: ignore[assignment]
        added: list[nn.Module] = []
        for host in encoder_part(model.base, "ffn").values():
            d_in, d_out = mlp_dims(host)
            if d_in != d_out:
                raise ConfigError(
                    f"adaptformer needs MLP blocks with equal in/out sizes, got {d_in} -> {d_out}"
                )
            ref = next(host.parameters())
            side = SideAdapter(bottleneck_mlp(d_in, cfg.hidden), cfg.scale, "input").to(ref.device, ref.dtype)
            added.append(attach_side_adapter(host, side))
        return added

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head and adapters."""
        return [*super().trainable(model), *side_adapter_parameters(model.base)]
