"""CBAM (convolutional block attention module) for 3D feature maps, as used by the attention U-Net.

Paper section 2.1 / docs/method.md "Network", attention variant: a channel gate then a spatial gate.
Global pooling uses plain tensor reductions (``mean`` and ``max(dim)``), not pooling modules: the reference
code's whole-volume ``avg_pool3d`` / ``max_pool3d`` kernels made the attention network 4.2x slower than the
plain one on GPU (docs/method.md "Measured anchors"); plain reductions bring that to about 1.2x.

Maxima use ``Tensor.max(dim)`` (values + indices; the backward scatters to the argmax) rather than ``amax``:
with torch 2.13, ``torch.compile`` (inductor) + bf16 autocast on CPU returns NaN gradients for ``amax``
after GroupNorm + ReLU (likely an equality mask between the input and a recomputed maximum that matches no
element, giving 0 / 0), which made every encoder gradient of the compiled attention U-Net NaN; ``max(dim)``
gives finite, eager-equal gradients there (tests/models/test_attention.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from brats_lightning.models.blocks import NormFactory, group_norm


class ChannelGate(nn.Module):
    """Channel attention: ``x * sigmoid(MLP(avg(x)) + MLP(max(x)))`` with a shared MLP C -> C/r -> C.

    Args:
        channels: input channels C.
        reduction: MLP reduction ratio r (16). The hidden width is ``max(1, C // r)`` so tiny test networks
            (C < 16) still build.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate, shape (B, C, 1, 1, 1), values in (0, 1)."""
        b, c = x.shape[:2]
        spatial = tuple(range(2, x.ndim))
        peak = x
        for dim in reversed(spatial):  # max over the spatial dims one at a time: no copy in any memory format
            peak = peak.max(dim=dim).values
        pooled = torch.cat([x.mean(dim=spatial), peak], dim=0)  # (2B, C): one MLP call
        att = self.mlp(pooled)
        att = att[:b] + att[b:]
        return torch.sigmoid(att).view(b, c, *([1] * len(spatial)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialGate(nn.Module):
    """Spatial attention: ``x * sigmoid(conv7x7x7([max_c(x), mean_c(x)]))``.

    Args:
        norm: norm factory, used only when ``gate_norm`` is True.
        kernel_size: size of the cubic convolution (7).
        gate_norm: False (default): conv (with bias) -> sigmoid, so the gate spans (0, 1) as in CBAM.
            True: conv (no bias) -> norm -> ReLU -> sigmoid, as the reference code did; the ReLU squashes
            the gate to [0.5, 1), so it can never suppress a voxel by more than half. Off by default; kept
            for reproducing the reference's attention U-Net.
    """

    def __init__(self, norm: NormFactory = group_norm, kernel_size: int = 7, gate_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2, bias=not gate_norm)
        self.post: nn.Module = (
            nn.Sequential(norm(1), nn.ReLU(inplace=True)) if gate_norm else nn.Identity()
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate, shape (B, 1, X, Y, Z)."""
        pooled = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.post(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel gate followed by spatial gate (Woo et al. 2018), for (B, C, X, Y, Z) tensors.

    Args:
        channels: input channels.
        norm: norm factory for the optional spatial-gate norm.
        reduction: channel-MLP reduction ratio.
        gate_norm: see :class:`SpatialGate` (default False; True squashes the spatial gate to [0.5, 1)).
    """

    def __init__(
        self, channels: int, norm: NormFactory = group_norm, reduction: int = 16, gate_norm: bool = False
    ) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(norm, gate_norm=gate_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))


def cbam_factory(norm: NormFactory, reduction: int = 16, gate_norm: bool = False) -> Callable[[int], CBAM]:
    """A ``num_channels -> CBAM`` factory for :class:`brats_lightning.models.blocks.Stage`."""

    def make(channels: int) -> CBAM:
        return CBAM(channels, norm=norm, reduction=reduction, gate_norm=gate_norm)

    return make
