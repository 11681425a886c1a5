"""Building blocks the adaptation methods add to a model.

Adapters beside or after an existing module are attached with a forward hook
(:func:`attach_side_adapter`): the host keeps its weights and state-dict keys, the adapter is
registered as the host's child ``fseft_adapter``, and the host's output becomes
``output + scale * adapter(source)`` with ``source`` the host's input (parallel adapter) or its output
(sequential residual adapter).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_ATTR = "fseft_adapter"


class SideAdapter(nn.Module):
    """An adapter added to a host module's output through a forward hook.

    Args:
        adapter: Maps the source tensor to a tensor shaped like the host's output.
        scale: Multiplier of the adapter's output.
        source: ``"input"`` (parallel to the host) or ``"output"`` (sequential, residual).
    """

    def __init__(self, adapter: nn.Module, scale: float, source: Literal["input", "output"]) -> None:
        super().__init__()
        self.adapter = adapter
        self.scale = scale
        self.source = source

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the host: add the scaled adapter output."""
        x = args[0] if self.source == "input" else output
        return output + self.scale * self.adapter(x)


def attach_side_adapter(host: nn.Module, side: SideAdapter) -> SideAdapter:
    """Register ``side`` as ``host.fseft_adapter`` and hook it onto ``host``'s output.

    Returns:
        ``side``.
    """
    host.add_module(ADAPTER_ATTR, side)
    host.register_forward_hook(side.hook)
    return side


def side_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every :class:`SideAdapter` inside ``model``."""
    return [p for m in model.modules() if isinstance(m, SideAdapter) for p in m.parameters()]


def mlp_dims(host: nn.Module) -> tuple[int, int]:
    """``(input, output)`` sizes of an MLP block: those of its first and last ``Linear`` layers."""
    linears = [m for m in host.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


class ResidualConvAdapter(nn.Module):
    """``x + conv(relu(conv(x)))`` with channels kept, no bias, the last convolution zero-initialised
    (so the adapter starts as the identity).

    Args:
        channels: Feature channels ``F``.
        kernel_size: Odd cubic kernel size (3 = spatial adapter, 1 = channel-only adapter).
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv3d(channels, channels, kernel_size, padding=pad, bias=False)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size, padding=pad, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.conv2(F.relu(self.conv1(x)))


def bottleneck_mlp(dim: int, hidden: int) -> nn.Sequential:
    """AdaptFormer's ``Linear(dim, hidden) -> ReLU -> Linear(hidden, dim)``, the up-projection
    zero-initialised (weight and bias) so that the adapter starts by adding nothing."""
    up = nn.Linear(hidden, dim)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), up)


class PHMRules(nn.Module):
    """The ``n`` shared ``n x n`` matrices ``A_i`` of the down- and up-projections of every Compacter
    layer in the model (Karimi Mahabadi et al., NeurIPS 2021).

    Args:
        n: Number of Kronecker summands (hypercomplex dimension).
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))
        self.up = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


class PHMLinear(nn.Module):
    """A linear layer whose weight is ``sum_i kron(A_i, s_i t_i^T)``: shared ``A_i`` (``n x n``) and a
    per-layer rank-1 ``B_i = s_i t_i^T`` (``out/n x in/n``), plus a bias.

    Args:
        in_features: Input size, a multiple of ``n``.
        out_features: Output size, a multiple of ``n``.
        rules: The shared :class:`PHMRules` (held by reference, not registered here, so that the
            shared matrices are stored once).
        which: ``"down"`` or ``"up"``: which shared rule set this layer uses.
        zero: Zero-initialise ``t`` and the bias (the layer then outputs zeros at start).
    """

    def __init__(
        self, in_features: int, out_features: int, rules: PHMRules, which: Literal["down", "up"], zero: bool
    ) -> None:
        super().__init__()
        n = rules.down.shape[0]
        std = (2.0 / (in_features + out_features)) ** 0.25  # Glorot variance of W split over s and t
        self.s = nn.Parameter(torch.randn(n, out_features // n, 1) * std)
        self.t = nn.Parameter(
            torch.zeros(n, 1, in_features // n) if zero else torch.randn(n, 1, in_features // n) * std
        )
        self.bias = nn.Parameter(torch.zeros(out_features))
        object.__setattr__(self, "_rules", rules)
        self.which = which

    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight ``sum_i kron(A_i, s_i t_i^T)``."""
        a = getattr(self._rules, self.which)  # [n, n, n]
        b = self.s @ self.t  # [n, out/n, in/n]
        n, p, q = b.shape
        return torch.einsum("iab,ipq->apbq", a, b).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(x, self.weight(), self.bias)


def phm_adapter(dim: int, hidden: int, rules: PHMRules) -> nn.Sequential:
    """Compacter adapter ``PHM(dim, hidden) -> ReLU -> PHM(hidden, dim)``, the up layer starting at zero."""
    return nn.Sequential(
        PHMLinear(dim, hidden, rules, "down", zero=False),
        nn.ReLU(),
        PHMLinear(hidden, dim, rules, "up", zero=True),
    )
