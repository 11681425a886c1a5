"""The 3D UNet of Models Genesis / CLIP-Driven Universal Model / SuPreM, without its output layer.

MONAI has no network with this layout, so it is written here, with module names identical to the
public ``model/Unet.py`` (``down_tr64 ... up_tr64``, ``ops.N.conv1`` / ``ops.N.bn1``, ``up_conv``) so
that the public SuPreM / CLIP-Driven UNet weights load by prefix renaming only.

Reference: Zhou et al., "Models Genesis", MICCAI 2019; Liu et al., "CLIP-Driven Universal Model",
ICCV 2023; Li et al., "How Well Do Supervised 3D Models Transfer to Medical Imaging Tasks?", ICLR 2024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchStatNorm3d(nn.BatchNorm3d):
    """Batch normalisation that always uses the statistics of the current batch.

    Reproduces ``ContBatchNorm3d`` of the public code (batch statistics in training *and* inference)
    while keeping the ``BatchNorm3d`` state-dict keys. Unlike the original, running statistics are
    never updated, so inference leaves the weights (and the model fingerprint) untouched.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class LUConv(nn.Module):
    """3x3x3 convolution, batch-statistics normalisation, ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = BatchStatNorm3d(out_ch)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two ``LUConv`` then (except at the deepest level) 2x max-pooling; also returns the skip."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, pool: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(in_ch, mid_ch), LUConv(mid_ch, out_ch))
        self.maxpool = nn.MaxPool3d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        skip = self.ops(x)
        return self.maxpool(skip), skip


class UpTransition(nn.Module):
    """2x transposed convolution, concatenation with the skip, two ``LUConv``."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_ch, in_ch, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(in_ch + skip_ch, out_ch), LUConv(out_ch, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class UNet3D(nn.Module):
    """Public "UNet3D" layout; returns the last decoder map (``2 * base`` channels, input resolution).

    Args:
        in_channels: Input channels.
        base: Width of the first convolution (32 in the public weights, giving 64 output channels).

    Input sides must be divisible by 8 (three poolings).
    """

    def __init__(self, in_channels: int = 1, base: int = 32) -> None:
        super().__init__()
        b = base
        self.down_tr64 = DownTransition(in_channels, b, 2 * b, pool=True)
        self.down_tr128 = DownTransition(2 * b, 2 * b, 4 * b, pool=True)
        self.down_tr256 = DownTransition(4 * b, 4 * b, 8 * b, pool=True)
        self.down_tr512 = DownTransition(8 * b, 8 * b, 16 * b, pool=False)
        self.up_tr256 = UpTransition(16 * b, 8 * b, 8 * b)
        self.up_tr128 = UpTransition(8 * b, 4 * b, 4 * b)
        self.up_tr64 = UpTransition(4 * b, 2 * b, 2 * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        out512, _ = self.down_tr512(out256)
        up256 = self.up_tr256(out512, skip256)
        up128 = self.up_tr128(up256, skip128)
        return self.up_tr64(up128, skip64)
