"""A residual 3D UNet with a strided stem: full-resolution output at a fraction of the CPU cost.

Built from MONAI's nnU-Net blocks (``UnetResBlock``, ``UnetUpBlock``). Where ``unet-small``
(BasicUNet) runs four 3x3x3 convolutions of ``feature_size`` channels at full resolution, which
take most of its time, this network runs one narrow convolution there (the stem) and one on the
way out, and starts its residual encoder at half resolution. Measured side by side on 2 CPU cores
by ``perf/train_step.py``.

Levels and widths for ``feature_size`` f: stem f (full resolution), encoder 2f, 4f, 8f (1/2, 1/4,
1/8), bottleneck 16f (1/16), decoder back to 2f at 1/2, then a transposed convolution to f,
concatenated with the stem and fused by one 3x3x3 convolution into the f-channel output map.
"""

from __future__ import annotations

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock, UnetUpBlock, get_conv_layer
from torch import nn

#: Normalisation and activation of every block (nnU-Net's defaults; affine norms for Affine-LN PEFT).
NORM = ("instance", {"affine": True})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class ResUNet(nn.Module):
    """Residual UNet whose forward returns the final ``feature_size``-channel map at input resolution.

    Args:
        in_channels: Input channels.
        feature_size: Channels of the full-resolution stem and output (f); deeper levels use
            2f, 4f, 8f and 16f.
        dropout: Dropout rate in the decoder blocks.

    Input sides must be multiples of 16 (four stride-2 levels).
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        f = feature_size
        widths = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        drop = dropout or None
        self.stem = get_conv_layer(3, in_channels, f, kernel_size=3, act=ACT, norm=NORM, conv_only=False)
        self.down = nn.ModuleList(
            UnetResBlock(3, widths[i], widths[i + 1], kernel_size=3, stride=2, norm_name=NORM, act_name=ACT)
            for i in range(4)
        )
        self.up = nn.ModuleList(
            UnetUpBlock(3, widths[i + 1], widths[i], kernel_size=3, stride=1, upsample_kernel_size=2,
                        norm_name=NORM, act_name=ACT, dropout=drop)  # fmt: skip
            for i in (3, 2, 1)
        )
        self.out_up = get_conv_layer(3, 2 * f, f, kernel_size=2, stride=2, conv_only=True, is_transposed=True)
        self.out_fuse = get_conv_layer(3, 2 * f, f, kernel_size=3, act=ACT, norm=NORM, conv_only=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        return self.out_fuse(torch.cat((self.out_up(y), skips.pop()), dim=1))
