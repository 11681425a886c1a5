"""What every adaptation method shares: its config, the freeze/unfreeze logic and the registry.

A method (HF peft's tuner design) is a small declarative class: it says which modules it adds to the
model (:meth:`AdaptMethod.inject`) and which parameters train (:meth:`AdaptMethod.trainable`).
Everything else happens once, here, in :meth:`AdaptMethod.setup`:

1. check that the method supports the backbone;
2. re-initialise the decoder / bottleneck when their policy is ``"new"`` (each module's
   ``reset_parameters``), and then the head too: its zero-shot rows fit the pre-trained decoder only
   (the reference code drops its classifier in that case as well);
3. call ``inject``;
4. freeze every parameter, then unfreeze ``trainable(model)`` plus the decoder / bottleneck groups
   whose policy is ``"fine-tuned"`` or ``"new"`` (and the encoder for ``trains_encoder`` methods);
5. decide which modules run in train mode during training: those groups, the modules ``inject``
   added, and every module whose own parameters all train (the head, the adapter's convolutions, the
   normalisation layers of ``affine-ln``). Everything else stays in eval mode: frozen parts, their
   dropout layers, and modules that mix frozen and trained parameters (a bitfit ``Linear``).

Methods find their targets only through :attr:`fseft.models.FoundationModel.roles`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from ...errors import ConfigError
from ...models.foundation import start_absent
from ...registry import Registry

if TYPE_CHECKING:
    from ...models import FoundationModel
    from ..model import AdaptedModel

Policy = Literal["frozen", "fine-tuned", "new"]
POLICIES: tuple[str, ...] = ("frozen", "fine-tuned", "new")
#: learning rate of every method when the decoder or bottleneck trains too (paper)
LR_WITH_DECODER = 1e-4

#: lowest learning rate of a head with a row that starts new (absent): the linear probe's. AdamW
#: moves a weight by about the rate per step, so at 1e-4 a zero row barely grows and the decoder,
#: whose gradient flows through it, barely learns (larynx k=10, LoRA with the decoder fine-tuned,
#: 400 steps: Dice 0.000 on seeds 0-2 with the head at 1e-4; 0.532 and 0.526 on seeds 0 and 1 at 1e-2).
NEW_HEAD_ROW_LR = 1e-2


@dataclass(frozen=True)
class MethodConfig:
    """Options every method has.

    Args:
        decoder: ``"frozen"`` (default), ``"fine-tuned"`` (pre-trained weights train) or ``"new"``
            (re-initialised with each module's ``reset_parameters``, then trained; every head row then
            starts absent as well, :func:`restart_head`).
        bottleneck: Same policy for the bottleneck (SwinUNETR: the convolutional skip encoders
            ``encoder1..4, encoder10``; UNets: the deepest contracting block).
        lr: Learning rate; ``None`` uses the method's paper default (:meth:`AdaptMethod.default_lr`).
        head_lr: Learning rate of the head alone in training (per-query refinement keeps ``lr``);
            ``None``: ``lr``, raised to :data:`NEW_HEAD_ROW_LR` when a head row starts new.

    Raises:
        ConfigError: on an unknown policy or a non-positive learning rate.
    """

    decoder: Policy = "frozen"
    bottleneck: Policy = "frozen"
    lr: float | None = None
    head_lr: float | None = None

    def __post_init__(self) -> None:
        for key in ("decoder", "bottleneck"):
            if getattr(self, key) not in POLICIES:
                raise ConfigError(
                    f"{key} policy must be one of {', '.join(POLICIES)}, got {getattr(self, key)!r}"
                )
        for key in ("lr", "head_lr"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{key} must be positive, got {value}")

    @property
    def trains_backbone_groups(self) -> bool:
        """True when the decoder or the bottleneck trains."""
        return self.decoder != "frozen" or self.bottleneck != "frozen"


class AdaptMethod:
    """Base class of adaptation methods; subclasses override :meth:`inject` and :meth:`trainable`.

    Class attributes:
        name: Registry name (``fseft adapt --method NAME``).
        description: One line for ``fseft methods``.
        config_cls: The method's :class:`MethodConfig` subclass.
        black_box: True when nothing upstream of the decoder output trains (with the decoder and
            bottleneck frozen), so the frozen features can be computed once and cached.
        paper_lr: Paper learning rate with a frozen decoder (``None``: nothing trains).
        backbones: Backbones the method applies to (``None``: all).
        trains_encoder: The whole encoder trains, in train mode (full fine-tuning).

    Args:
        config: The method's options (an instance of ``config_cls``).

    Raises:
        ConfigError: when ``config`` is not an instance of ``config_cls``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    black_box: ClassVar[bool] = False
    paper_lr: ClassVar[float | None] = None
    backbones: ClassVar[tuple[str, ...] | None] = None
    trains_encoder: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise ConfigError(
                f"method {self.name!r} takes a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @classmethod
    def default_lr(cls, config: MethodConfig) -> float | None:
        """The paper's learning rate for ``config``: ``paper_lr``, or 1e-4 when the decoder or
        bottleneck also trains; ``None`` when the method trains nothing."""
        if cls.paper_lr is None:
            return None
        return LR_WITH_DECODER if config.trains_backbone_groups else cls.paper_lr

    @property
    def lr(self) -> float | None:
        """``config.lr`` when set, else :meth:`default_lr`."""
        return self.config.lr if self.config.lr is not None else self.default_lr(self.config)

    def check(self, model: FoundationModel) -> None:
        """Refuse a backbone the method does not apply to.

        Raises:
            ConfigError: naming the backbones the method supports.
        """
        arch = model.config.arch
        if self.backbones is not None and arch not in self.backbones:
            raise ConfigError(
                f"method {self.name!r} does not apply to backbone {arch!r}; it supports: {', '.join(self.backbones)}"
            )

    def inject(self, model: AdaptedModel) -> list[nn.Module]:
        """Add the method's modules to ``model`` (its ``base``, ``adapter`` or ``head``).

        Returns:
            The modules added (they run in train mode while training).
        """
        return []

    def trainable(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Parameters the method trains (besides the decoder / bottleneck policy): the head."""
        return list(model.head.parameters())

    def setup(self, model: AdaptedModel) -> None:
        """Prepare ``model`` (freshly built around a copy of the base) for training; see the module doc."""
        self.check(model.base)
        policies = {"decoder": self.config.decoder, "bottleneck": self.config.bottleneck}
        for role, policy in policies.items():
            if policy == "new":
                for group in model.base.role(role).values():
                    for m in group.modules():
                        if callable(getattr(m, "reset_parameters", None)):
                            m.reset_parameters()
        if "new" in policies.values():
            restart_head(model)
        added = self.inject(model)
        groups = [
            g
            for role, policy in policies.items()
            if policy != "frozen"
            for g in model.base.role(role).values()
        ]
        if self.trains_encoder:
            groups += list(model.base.role("encoder").values())
        for p in model.parameters():
            p.requires_grad_(False)
        for p in [*self.trainable(model), *(p for g in groups for p in g.parameters())]:
            p.requires_grad_(True)
        owners = [
            m
            for m in model.modules()
            if (own := list(m.parameters(recurse=False))) and all(p.requires_grad for p in own)
        ]
        model.set_train_modules(_outermost(model, [*groups, *added, *owners]))
        model.eval()


def _outermost(root: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    """Names of ``modules`` under ``root``, without duplicates or modules nested in another one."""
    ids = {id(m): n for n, m in root.named_modules()}
    names = list(dict.fromkeys(ids[id(m)] for m in modules))
    return [n for n in names if not any(n.startswith(f"{o}.") for o in names if o != n)]


def encoder_part(model: FoundationModel, role: str) -> dict[str, nn.Module]:
    """The modules of ``role`` that lie inside the backbone's ``encoder`` role (not the bottleneck).

    Raises:
        ConfigError: when the backbone has no such role.
    """
    inside = {id(m) for g in model.role("encoder").values() for m in g.modules()}
    return {n: m for n, m in model.role(role).items() if id(m) in inside}


def is_transformer(model: FoundationModel) -> bool:
    """True for backbones whose role map has attention (``qkv``) layers."""
    return "qkv" in model.roles


METHODS: Registry[type[AdaptMethod]] = Registry("adaptation method")


def register_method(cls: type[AdaptMethod]) -> type[AdaptMethod]:
    """Class decorator: register ``cls`` under ``cls.name``.

    Raises:
        ConfigError: when the name is already registered.
    """
    return METHODS.add(cls.name, cls)


def get_method(name: str) -> type[AdaptMethod]:
    """The method class registered as ``name``.

    Raises:
        ConfigError: listing the registered methods when ``name`` is unknown.
    """
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return METHODS.names()


def restart_head(model: AdaptedModel) -> None:
    """Start every head row of ``model`` anew: foreground rows absent
    (:func:`fseft.models.foundation.start_absent`), a multi-class background row zero."""
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    off = int(model.task == "multiclass")
    start_absent(model.head, range(off, model.head.out_channels))
    model.new_head_rows = model.structures
