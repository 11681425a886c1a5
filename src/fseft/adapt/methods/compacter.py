"""``compacter``: low-rank hypercomplex (PHM) adapters after every Swin block's MLP
(Karimi Mahabadi, Henderson & Ruder, "Compacter", NeurIPS 2021).

This is the Compacter of its paper, not the reference code's variant: the reference
(jusiro/fewshot-finetuning, ``fseft/modeling/peft/Compacter.py``) applies a full-rank
``PHMLinear(d, d, n = 4)`` (own rules per layer, Glorot-initialised, so the model does not start as
the base) in sequence, without a residual, after both the attention and the MLP of every block, and
also trains every Swin normalisation layer. Results of this method are therefore not the paper's
Compacter rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ...errors import ConfigError
from .base import AdaptMethod, MethodConfig, encoder_part, register_method
from .layers import PHMRules, SideAdapter, attach_side_adapter, mlp_dims, phm_adapter, side_adapter_parameters

if TYPE_CHECKING:
    from ..model import AdaptedModel

RULES_ATTR = "fseft_phm_rules"


@dataclass(frozen=True)
class CompacterConfig(MethodConfig):
    """Compacter options.

    Args:
        n: Hypercomplex dimension: number of Kronecker summands; divides ``hidden`` and every block width.
        hidden: Width of the adapter's bottleneck (16).
        scale: Multiplier of the adapter output (1: Compacter's residual adapter).

    Raises:
        ConfigError: on a non-positive ``n`` or ``hidden`` not divisible by ``n``.
    """

    n: int = 4
    hidden: int = 16
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1 or self.hidden < 1 or self.hidden % self.n:
            raise ConfigError(
                f"compacter needs hidden ({self.hidden}) to be a positive multiple of n ({self.n})"
            )


@register_method
class Compacter(AdaptMethod):
    """A residual adapter ``h + s * up(relu(down(h)))`` on the output ``h`` of every Swin block's MLP
    (role ``ffn``; Compacter/Houlsby placement after the feed-forward layer), where ``down`` and ``up``
    are PHM layers ``W = sum_i kron(A_i, s_i t_i^T)`` (``n = 4``): the ``A_i`` are shared by all layers
    (one set for down-, one for up-projections, ``2 n^3`` values, stored once under the encoder as
    ``fseft_phm_rules``) and each layer has rank-1 factors plus a bias. ``up`` starts at zero, so the
    model starts as the base. Parameters per block of width ``d``: ``3 * (d + hidden)``; lr 1e-2."""

    name = "compacter"
    description = "PHM (hypercomplex, rank-1, shared) adapter after each Swin MLP + head (Compacter paper's, not the reference code's)"
    config_cls = CompacterConfig
    paper_lr = 1e-2
    backbones = ("swinunetr",)

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Create the shared rules under the encoder and attach one adapter per encoder MLP block.

        Raises:
            ConfigError: when a block width is not divisible by ``n``.
        """
        cfg: CompacterConfig = self.config  # type: ignore[assignment]
        encoder = next(iter(model.base.role("encoder").values()))
        ref = next(encoder.parameters())
        rules = PHMRules(cfg.n).to(ref.device, ref.dtype)
        encoder.add_module(RULES_ATTR, rules)
        added: list[nn.Module] = [rules]
        for host in encoder_part(model.base, "ffn").values():
            d, d_out = mlp_dims(host)
            if d % cfg.n or d != d_out:
                raise ConfigError(
                    f"compacter: MLP width {d} -> {d_out} must be equal and divisible by n={cfg.n}"
                )
            side = SideAdapter(phm_adapter(d, cfg.hidden, rules), cfg.scale, "output").to(
                ref.device, ref.dtype
            )
            added.append(attach_side_adapter(host, side))
        return added

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Head, shared rules and per-layer factors."""
        rules = [p for m in model.base.modules() if isinstance(m, PHMRules) for p in m.parameters()]
        return [*super().trainable(model), *rules, *side_adapter_parameters(model.base)]
