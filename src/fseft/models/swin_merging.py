"""Swin patch merging variants, chosen per model (``ModelConfig.swin_merging``).

Every public SwinUNETR checkpoint fseft knows (the FSEFT authors', CLIP-Driven, SuPreM, MONAI BTCV
and SSL) was trained with MONAI v0.9's patch merging, whose eight 3D sub-voxel slices repeat two of
them: slices 5 and 6 are slices 2 and 3 again, and the sub-voxels ``(1, 1, 0)`` and ``(0, 1, 1)`` are
never read. Later MONAI versions fixed the order (``PatchMerging`` reads all eight), so these weights
load without a missing key but compute a different function. ``"legacy"`` restores the v0.9
forward; ``"current"`` keeps the installed MONAI's ``PatchMerging``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2
from torch import nn

#: (depth, height, width) offsets of the eight slices MONAI v0.9 concatenated, in its order
LEGACY_SLICES: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1),
)  # fmt: skip


class LegacyPatchMerging(PatchMergingV2):
    """MONAI v0.9's 3D patch merging: the same parameters as MONAI's ``PatchMerging`` (``norm`` over
    ``8 * dim`` channels, then ``reduction`` to ``2 * dim``), the slices of :data:`LEGACY_SLICES`.
    2D inputs merge as in MONAI (v0.9's 2D order was already correct)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_SLICES], -1)
        return self.reduction(self.norm(x))


#: ``ModelConfig.swin_merging`` value -> the merging class SwinUNETR is built with (``downsample``)
SWIN_MERGINGS: dict[str, type[nn.Module]] = {"current": PatchMerging, "legacy": LegacyPatchMerging}
