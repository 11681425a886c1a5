"""``FoundationModel``: a backbone plus the universal head (one 1x1x1 output channel per structure).

Silva-Rodríguez, Dolz & Ben Ayed, MedIA 2025: a supervised-pretrained volumetric model whose head
holds one sigmoid classifier per anatomical structure; adaptation methods reuse its decoder
features (:meth:`FoundationModel.features`) and its head rows (:meth:`FoundationModel.head_row`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .backbones import BackboneSpec, RoleMap, get_backbone
from .config import ModelConfig

#: Prior probability of foreground the head's biases start at (``bias = -log((1 - p) / p)``, as in
#: RetinaNet): every sigmoid starts near "absent" instead of 0.5 everywhere, so partial-label
#: pre-training of small structures does not first spend hundreds of steps unlearning a half-full
#: prediction (measured on one OpenKBP crop, mandible Dice after 10 steps: 0.06 with a zero bias,
#: 0.83 with this prior).
HEAD_PRIOR = 0.01

#: The bias of a head row at :data:`HEAD_PRIOR` (its logit).
HEAD_PRIOR_BIAS = -math.log((1 - HEAD_PRIOR) / HEAD_PRIOR)


def start_absent(head: nn.Conv3d, rows: Iterable[int]) -> None:
    """Start head ``rows`` (output channels) "absent": zero weights, :data:`HEAD_PRIOR_BIAS` bias.

    Each such row predicts foreground with probability :data:`HEAD_PRIOR` everywhere, whatever the
    seed. The paper's reference code starts a new structure's row Xavier-uniform with zero bias,
    which is a lottery: over six seeds that row first called 2% to 92% of an OpenKBP larynx crop
    foreground, and LoRA with the decoder fine-tuned (larynx, k=10) reached Dice 0.024 after 1600
    steps on a seed whose row started at 79%, against 0.616 after 800 steps from this start
    (docs/results/openkbp.md). Adaptation trains such a row at no less than
    :data:`fseft.adapt.methods.base.NEW_HEAD_ROW_LR`.
    """
    with torch.no_grad():
        for i in rows:
            head.weight[i].zero_()
            head.bias[i].fill_(HEAD_PRIOR_BIAS)


class FoundationModel(nn.Module):
    """Backbone + universal head (biases initialised to the :data:`HEAD_PRIOR` foreground prior).

    Args:
        cfg: The model configuration (kept as ``.config``).

    Raises:
        ConfigError: when the backbone is unknown or rejects the configuration or its ROI.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = get_backbone(cfg.arch)
        spec.check(cfg)
        spec.check_shape(cfg.preprocess.roi, what="preprocess.roi")
        self.config = cfg
        self.spec: BackboneSpec = spec
        self.backbone = spec.build(cfg)
        self.feature_channels = spec.out_channels(cfg)
        self.head = nn.Conv3d(self.feature_channels, len(cfg.structures), kernel_size=1)
        nn.init.constant_(self.head.bias, HEAD_PRIOR_BIAS)
        #: JSON-able metadata saved with the model (training history, data summary)
        self.extra: dict[str, Any] = {}

    @property
    def structures(self) -> tuple[str, ...]:
        """Canonical structure names, one per head channel, in channel order."""
        return self.config.structures

    @property
    def untrained_head_rows(self) -> tuple[str, ...]:
        """Structures whose head row received no trained weights when the model was loaded (a
        headless public checkpoint): zero-shot refuses them, adaptation starts them new."""
        return tuple(self.extra.get("untrained_head_rows", ()))

    @property
    def task(self) -> str:
        """``"binary"``: one sigmoid channel per structure (the surface inference reads, with
        :attr:`structures` and :attr:`foundation`)."""
        return "binary"

    @property
    def foundation(self) -> FoundationModel:
        """The foundation model whose preprocessing and backbone this model runs on: itself."""
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Final decoder feature map.

        Args:
            x: ``[B, in_channels, X, Y, Z]`` with sides legal for the backbone.

        Returns:
            ``[B, F, X, Y, Z]`` with ``F = feature_channels``.

        Raises:
            ConfigError: when the input's channels or spatial sizes are illegal for the backbone.
        """
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"model expects input [B, {self.config.in_channels}, X, Y, Z], got {list(x.shape)}"
            )
        self.spec.check_shape(x.shape[2:])
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, X, Y, Z]``, one channel per structure (apply a sigmoid for probabilities)."""
        return self.head(self.features(x))

    def structure_index(self, name: str) -> int:
        """Head channel of structure ``name`` (synonyms resolved by :func:`fseft.anatomy.canonical`).

        Raises:
            ConfigError: naming the model's structures when ``name`` is not one of them.
        """
        from ..anatomy import canonical

        try:
            key = canonical(name)
        except ConfigError:
            key = name
        if key not in self.structures:
            raise ConfigError(
                f"structure {name!r} is not in this model's head; known: {', '.join(self.structures)}"
            )
        return self.structures.index(key)

    def head_row(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's classifier for one structure, to initialise a new head from it.

        Returns:
            ``(weight [F], bias [])``: detached copies.

        Raises:
            ConfigError: naming the model's structures when ``name`` is not one of them.
        """
        i = self.structure_index(name)
        return self.head.weight[i, :, 0, 0, 0].detach().clone(), self.head.bias[i].detach().clone()

    @property
    def roles(self) -> RoleMap:
        """Named module groups (``encoder``, ``bottleneck``, ``decoder``, ``head`` and per-backbone
        ``qkv``/``proj``/``mlp``/``norm`` or ``conv``/``norm``), names relative to this model."""
        out = {
            role: {f"backbone.{name}": m for name, m in group.items()}
            for role, group in self.spec.roles(self.backbone).items()
        }
        out["head"] = {"head": self.head}
        return out

    def role(self, name: str) -> dict[str, nn.Module]:
        """One group of :attr:`roles`.

        Raises:
            ConfigError: listing the roles this backbone has when ``name`` is not one of them.
        """
        roles = self.roles
        if name not in roles:
            raise ConfigError(
                f"backbone {self.config.arch!r} has no role {name!r}; roles: {', '.join(roles)}"
            )
        return roles[name]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def fingerprint(self) -> str:
        """Short sha256 over the sorted state dict (names, dtypes, shapes, values).

        Adapter files record it to refuse being applied to a different base model.
        """
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def build_model(cfg: ModelConfig) -> FoundationModel:
    """A randomly initialised :class:`FoundationModel` for ``cfg``.

    Raises:
        ConfigError: for an unknown backbone or a configuration/ROI it rejects.
    """
    return FoundationModel(cfg)
