"""``AdaptedModel``: a foundation model adapted by one method, and :func:`apply_method`, the one way
to build it (HF peft's ``get_peft_model``).

Forward pass: ``head(adapter(base.features(x)))``. ``base`` is a deep copy of the caller's
:class:`~fseft.models.FoundationModel` (possibly with PEFT modules injected into its encoder), so the
caller's model is never modified; its own universal head is kept, frozen and unused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..anatomy import canonical
from ..errors import ConfigError
from ..models import FoundationModel
from ..models.foundation import start_absent
from .methods import AdaptMethod, MethodConfig, get_method
from .methods.base import NEW_HEAD_ROW_LR

Task = Literal["binary", "multiclass"]
#: The prediction tasks: one sigmoid channel per structure, or one softmax with background.
TASKS: tuple[str, ...] = ("binary", "multiclass")


def check_task(task: str) -> None:
    """Refuse a task outside :data:`TASKS`.

    Raises:
        ConfigError: naming the valid tasks.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; task must be one of {', '.join(TASKS)}")


class AdaptedModel(nn.Module):
    """A foundation model plus what an adaptation method added and trains.

    Args:
        base: The (copied) foundation model.
        head: ``Conv3d(F, C, 1)``; ``C = len(structures)`` for ``"binary"`` tasks (one sigmoid
            channel per structure), ``1 + len(structures)`` for ``"multiclass"`` (softmax,
            background at channel 0).
        structures: Target structures, in head-channel order (after background for multiclass).
        task: ``"binary"`` or ``"multiclass"``.
        method: The method that built this model (holds its config).
        base_fingerprint: :meth:`FoundationModel.fingerprint` of the un-adapted base.
    """

    def __init__(
        self,
        base: FoundationModel,
        head: nn.Conv3d,
        structures: tuple[str, ...],
        task: Task,
        method: AdaptMethod,
        base_fingerprint: str,
    ) -> None:
        super().__init__()
        self.base = base
        #: module on the decoder feature map before the head (identity unless the method adds one)
        self.adapter: nn.Module = nn.Identity()
        self.head = head
        self.structures = structures
        self.task = task
        self.method = method
        self.base_fingerprint = base_fingerprint
        #: structures whose head row started absent (no trained row to start from)
        self.new_head_rows: tuple[str, ...] = ()
        self._train_modules: tuple[str, ...] = ()

    @property
    def method_name(self) -> str:
        """Registry name of the method."""
        return self.method.name

    @property
    def config(self) -> MethodConfig:
        """The method's configuration."""
        return self.method.config

    @property
    def foundation(self) -> FoundationModel:
        """The foundation model whose preprocessing and backbone this model runs on (:attr:`base`)."""
        return self.base

    @property
    def lr(self) -> float | None:
        """Learning rate to train with (the config's, else the paper default; ``None``: nothing trains)."""
        return self.method.lr

    @property
    def black_box(self) -> bool:
        """True when nothing upstream of the decoder output trains: :meth:`features` is fixed and can
        be cached, and training only needs :meth:`forward_features`."""
        return self.method.black_box and not self.config.trains_backbone_groups

    @property
    def frozen_features(self) -> bool:
        """True when :meth:`features` is the un-adapted base's (black-box method, nothing in the base
        trains): its output can be stored and reused under :attr:`base_fingerprint`."""
        return self.black_box and not any(p.requires_grad for p in self.base.parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder feature map ``[B, F, X, Y, Z]`` of the (frozen or PEFT-adapted) base."""
        return self.base.features(x)

    def forward_features(self, f: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, X, Y, Z]`` from a feature map: adapter, then head."""
        return self.head(self.adapter(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, X, Y, Z]`` (sigmoid per channel for ``"binary"``, softmax for ``"multiclass"``)."""
        return self.forward_features(self.features(x))

    def set_train_modules(self, names: Sequence[str]) -> None:
        """Name the sub-modules that :meth:`train` puts in train mode (set by the method)."""
        for name in names:
            self.get_submodule(name)
        self._train_modules = tuple(names)

    @property
    def train_modules(self) -> tuple[str, ...]:
        """Names of the sub-modules that run in train mode while training."""
        return self._train_modules

    def train(self, mode: bool = True) -> AdaptedModel:
        """Train mode for what the method trains (and the modules it added); frozen parts stay in eval.

        Returns:
            ``self``.
        """
        super().train(False)
        self.training = mode
        if mode:
            for name in self._train_modules:
                self.get_submodule(name).train(True)
        return self

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that train, by name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def head_lr(self, lr: float) -> float:
        """The head's learning rate when the rest trains at ``lr``: the config's ``head_lr``, else
        ``lr`` raised to :data:`~fseft.adapt.methods.base.NEW_HEAD_ROW_LR` when a row started new."""
        if self.config.head_lr is not None:
            return self.config.head_lr
        return max(lr, NEW_HEAD_ROW_LR) if self.new_head_rows else lr

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The trained parameters as optimiser groups: the head's at :meth:`head_lr`, the rest at ``lr``."""
        params = self.trainable_parameters()
        head_lr = self.head_lr(lr)
        if head_lr == lr:
            return [{"params": list(params.values()), "lr": lr}]
        head = {f"head.{n}" for n, _ in self.head.named_parameters()}
        return [
            {"params": [p for n, p in params.items() if n not in head], "lr": lr},
            {"params": [p for n, p in params.items() if n in head], "lr": head_lr},
        ]

    def num_trainable(self) -> int:
        """Number of trained parameter values."""
        return sum(p.numel() for p in self.trainable_parameters().values())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training can change: the trained parameters plus the persistent buffers
        (e.g. batch-norm running statistics) of the modules that run in train mode. Detached."""
        keep = set(self.trainable_parameters())
        for root in self._train_modules:
            prefix = f"{root}." if root else ""
            for name, m in self.get_submodule(root).named_modules():
                for b in m._buffers:
                    if m._buffers[b] is not None and b not in m._non_persistent_buffers_set:
                        keep.add(f"{prefix}{name}.{b}" if name else f"{prefix}{b}")
        return {k: v.detach() for k, v in self.state_dict().items() if k in keep}


def _target_structures(structures: Sequence[str]) -> tuple[str, ...]:
    if isinstance(structures, str) or not structures:
        raise ConfigError(f"structures must be a non-empty list of names, got {structures!r}")
    out = []
    for s in structures:
        try:
            out.append(canonical(s))
        except ConfigError:  # a structure outside the catalogue: a novel target, kept as named
            out.append(s)
    dupes = sorted({s for s in out if out.count(s) > 1})
    if dupes:
        raise ConfigError(f"target structures list {dupes} more than once")
    return tuple(out)


def new_head_rows(base: FoundationModel, structures: Sequence[str]) -> tuple[str, ...]:
    """The ``structures`` that ``base`` has no trained head row for (novel ones, or untrained rows of
    a headless checkpoint): their rows start absent."""
    return tuple(s for s in structures if s not in base.structures or s in base.untrained_head_rows)


def initial_head(base: FoundationModel, structures: tuple[str, ...], task: Task) -> nn.Conv3d:
    """A new ``1x1x1`` head for ``structures``, zero-shot initialised where possible.

    Rows of structures the base has a trained head row for are copies of it; other rows (novel
    structures, untrained rows of a headless checkpoint) start absent
    (:func:`fseft.models.foundation.start_absent`). For ``"multiclass"`` the background row
    (channel 0) is zero (weight and bias): with every foreground logit ``l`` equal to the zero-shot
    sigmoid logit, ``softmax([0, l])`` equals ``sigmoid(l)``, so the initial multi-class model makes
    the zero-shot decisions exactly.
    """
    off = int(task == "multiclass")
    ref = base.head.weight
    head = nn.Conv3d(base.feature_channels, off + len(structures), kernel_size=1).to(ref.device, ref.dtype)
    new = new_head_rows(base, structures)
    known = {i: name for i, name in enumerate(structures) if name not in new}
    with torch.no_grad():
        # every row is overwritten below; the draw keeps the random stream of the adapter's own
        # initialisation (which follows) as it was when new rows started from it
        nn.init.xavier_uniform_(head.weight)
        head.weight[:off].zero_()
        head.bias[:off].zero_()
        start_absent(head, [off + i for i in range(len(structures)) if i not in known])
        for i, name in known.items():
            w, b = base.head_row(name)
            head.weight[off + i, :, 0, 0, 0] = w
            head.bias[off + i] = b
    return head


def apply_method(
    model: FoundationModel,
    method_name: str,
    structures: Sequence[str],
    task: Task = "binary",
    config: MethodConfig | None = None,
    *,
    base_fingerprint: str | None = None,
) -> AdaptedModel:
    """Adapt (a deep copy of) ``model`` with a registered method; ``model`` itself is untouched.

    Args:
        model: The foundation model.
        method_name: A name from :func:`fseft.adapt.list_methods`.
        structures: Target structures (catalogue names or synonyms are canonicalised; names outside
            the catalogue are novel structures).
        task: ``"binary"`` (one sigmoid channel per structure) or ``"multiclass"`` (softmax with a
            background channel 0).
        config: The method's options (default: its config class's paper defaults).
        base_fingerprint: ``model.fingerprint()`` when the caller already has it (saves hashing).

    Returns:
        The :class:`AdaptedModel`, in eval mode, with only the method's parameters trainable.

    Raises:
        ConfigError: unknown method/task, a config of the wrong class, a backbone the method does not
            support, or (zero-shot) a structure the model does not know.
    """
    cls = get_method(method_name)
    method = cls(config if config is not None else cls.config_cls())
    check_task(task)
    method.check(model)
    targets = _target_structures(structures)
    fingerprint = base_fingerprint or model.fingerprint()
    base = copy.deepcopy(model)
    adapted = AdaptedModel(base, initial_head(base, targets, task), targets, task, method, fingerprint)
    adapted.new_head_rows = new_head_rows(base, targets)
    method.setup(adapted)
    return adapted
