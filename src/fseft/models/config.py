"""``ModelConfig``: what a foundation model is (backbone, width, head structures, preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import PreprocessConfig, from_dict, to_dict
from ..errors import ConfigError

#: values of ``ModelConfig.swin_merging`` (the classes live in :mod:`fseft.models.swin_merging`)
SWIN_MERGING_NAMES: tuple[str, ...] = ("current", "legacy")


@dataclass(frozen=True)
class ModelConfig:
    """A foundation model: a registered backbone plus a 1x1x1 head with one sigmoid channel per structure.

    The config travels inside every saved model so that weights, preprocessing and label template
    stay together (timm-style pretrained cfg).

    Args:
        arch: Backbone name from :data:`fseft.models.backbones.BACKBONES` (``swinunetr``, ``unet3d``,
            ``unet-small``).
        feature_size: Backbone width. SwinUNETR: embedding size, a multiple of 12 (48 = paper);
            ``unet3d``: channels of the final decoder map (64 = public SuPreM layout);
            ``unet-small``: channels of the first level (16 by default).
        structures: Canonical names (:func:`fseft.anatomy.canonical`) of the head channels, in order.
        preprocess: Spacing, HU window and ROI the model was trained with.
        in_channels: Input channels (1 for CT).
        use_checkpoint: Gradient checkpointing in the Swin transformer blocks (SwinUNETR only).
        dropout: Dropout rate inside the backbone (SwinUNETR: transformer dropout; ``unet-small``:
            decoder dropout; ignored by ``unet3d``, whose public layout has none).
        swin_merging: SwinUNETR patch merging (:data:`fseft.models.swin_merging.SWIN_MERGINGS`):
            ``"current"`` (the installed MONAI's ``PatchMerging``: new models) or ``"legacy"`` (MONAI
            v0.9's, which every public SwinUNETR checkpoint was trained with). Ignored by UNets.

    Raises:
        ConfigError: on empty/duplicate/unknown structures or out-of-range values.
    """

    arch: str = "swinunetr"
    feature_size: int = 48
    structures: tuple[str, ...] = ()
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    in_channels: int = 1
    use_checkpoint: bool = False
    dropout: float = 0.0
    swin_merging: str = "current"

    def __post_init__(self) -> None:
        from ..anatomy import canonical

        if not self.structures:
            raise ConfigError("ModelConfig.structures must name at least one structure")
        names = tuple(canonical(s) for s in self.structures)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"ModelConfig.structures lists {dupes} more than once")
        object.__setattr__(self, "structures", names)
        if self.feature_size < 1:
            raise ConfigError(f"feature_size must be positive, got {self.feature_size}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be positive, got {self.in_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.swin_merging not in SWIN_MERGING_NAMES:
            raise ConfigError(
                f"swin_merging must be one of {', '.join(SWIN_MERGING_NAMES)}, got {self.swin_merging!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (see :func:`fseft.config.to_dict`)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: on unknown keys or invalid values.
        """
        return from_dict(cls, data)
