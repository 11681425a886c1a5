"""``linear-probe``: a new 1x1x1 head on the frozen decoder features (black-box adapter)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import AdaptMethod, MethodConfig, register_method


@dataclass(frozen=True)
class LinearProbeConfig(MethodConfig):
    """Linear probe options: only the shared ones (decoder/bottleneck policy, lr).

    The head is initialised from the base's head row for structures it knows (zero-shot
    initialisation); other rows start absent (zero weights, prior bias); multi-class heads get a zero background row
    (:func:`fseft.adapt.model.initial_head`).
    """


@register_method
class LinearProbe(AdaptMethod):
    """Linear probe (Silva-Rodríguez et al., MedIA 2025): only the ``Conv3d(F, C, 1)`` head trains,
    ``F * C + C`` parameters; lr 1e-2 (1e-4 with the decoder training)."""

    name = "linear-probe"
    description = "new 1x1x1 head on frozen features (zero-shot init for known structures)"
    config_cls = LinearProbeConfig
    black_box = True
    paper_lr = 1e-2
