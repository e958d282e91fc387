"""Building blocks of the 3D U-Nets: injectable norms, conv-norm-ReLU blocks and two-block stages.

docs/method.md "Network": a block is Conv3d 3x3x3 (padding = dilation, no bias) -> Norm -> ReLU, a stage is
two
blocks. The norm is injected as a callable ``norm(num_channels) -> nn.Module`` (house style 1), so Hydra can
swap GroupNorm (pipeline A) for InstanceNorm (pipeline B) with ``_partial_: true``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

NormFactory = Callable[[int], nn.Module]
"""A callable ``num_channels -> nn.Module`` building one normalization layer."""

AttentionFactory = Callable[[int], nn.Module]
"""A callable ``num_channels -> nn.Module`` building an attention module (e.g. CBAM) for a stage output."""


GROUP_RULES = ("gcd", "authors")


def authors_groups(num_channels: int, groups: int = 16) -> int:
    """The number of groups the authors' code (``src/models/layers.py``, ``default_norm_layer``) used.

    ``min(groups, num_channels)`` when that divides ``num_channels``; otherwise the largest group *size*
    among 16, 8, 4, 2, 1 that divides ``num_channels`` sets the count: 24 channels -> groups of 8 -> 3
    groups (and 12 channels -> 12 groups, 40 -> 5). The code starts that search at 16 whatever ``groups``.
    """
    count = min(groups, num_channels)
    if num_channels % count == 0:
        return count
    size = 16
    while num_channels % size:
        size //= 2
    return num_channels // size


def group_norm(num_channels: int, groups: int = 16, rule: str = "gcd") -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (16 in the paper, pipeline A).

    When ``num_channels`` is not a multiple of ``groups`` (tiny test widths, or the 24-channel layers of the
    w=48 ``Unet``), ``rule`` picks the number of groups: ``"gcd"`` (default) the largest divisor of
    ``num_channels`` that also divides ``groups``, i.e. ``gcd(num_channels, groups)`` (24 channels -> 8
    groups of 3); ``"authors"`` the authors' code's rule (:func:`authors_groups`: 24 -> 3 groups of 8;
    docs/fidelity.md). The parameter count is the same either way.

    Args:
        num_channels: channels to normalize.
        groups: wanted number of groups.
        rule: ``"gcd"`` or ``"authors"``.

    Returns:
        ``nn.GroupNorm(n_groups, num_channels)`` (affine, weight 1, bias 0).
    """
    if num_channels < 1 or groups < 1:
        raise ValueError(
            f"group_norm: got num_channels={num_channels}, groups={groups}; both must be >= 1 "
            "(check the network width in conf/model/)"
        )
    if rule not in GROUP_RULES:
        raise ValueError(f"group_norm: got rule={rule!r}; expected one of {GROUP_RULES} (pipeline.norm.rule)")
    n_groups = math.gcd(num_channels, groups) if rule == "gcd" else authors_groups(num_channels, groups)
    return nn.GroupNorm(n_groups, num_channels)


def instance_norm(num_channels: int) -> nn.InstanceNorm3d:
    """InstanceNorm3d with a learned affine transform (pipeline B), no running statistics.

    Args:
        num_channels: channels to normalize.
    """
    return nn.InstanceNorm3d(num_channels, affine=True)


class ConvNormAct(nn.Sequential):
    """Conv3d 3x3x3 (no bias, padding = dilation) -> norm -> ReLU (docs/method.md "Network", block).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: norm factory ``num_channels -> nn.Module``.
        dilation: convolution dilation (2 in the "bottom" stage).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: NormFactory, dilation: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv3d(
                    in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation, bias=False
                ),
                norm=norm(out_channels),
                act=nn.ReLU(inplace=True),
            )
        )


class Stage(nn.Sequential):
    """A chain of :class:`ConvNormAct` blocks through ``widths``, optionally followed by attention.

    ``Stage((c_in, c_mid, c_out), norm)`` is the usual two-block U-Net stage; ``Stage((16w, 4w), norm)`` is
    the single-block "bottom_2". Children are named ``block1``, ``block2``, ... and ``attention``.

    Args:
        widths: channel counts, input first (at least two entries).
        norm: norm factory.
        dilation: dilation of every block of the stage.
        attention: optional factory ``num_channels -> nn.Module`` applied to the stage output (CBAM).
    """

    def __init__(
        self,
        widths: Sequence[int],
        norm: NormFactory,
        dilation: int = 1,
        attention: AttentionFactory | None = None,
    ) -> None:
        if len(widths) < 2:
            raise ValueError(f"Stage: got widths={tuple(widths)}; expected (in, [mid, ...,] out)")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
            layers[f"block{i}"] = ConvNormAct(c_in, c_out, norm, dilation=dilation)
        if attention is not None:
            layers["attention"] = attention(widths[-1])
        super().__init__(layers)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv3d:
    """1x1x1 Conv3d with bias (segmentation head and deep-supervision heads)."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=True)


def init_weights(module: nn.Module) -> None:
    """docs/method.md "Network" init: Kaiming normal (fan_out, relu) for Conv3d, conv bias 0, norm weight
    1, bias 0.

    (The reference code left conv biases at PyTorch's default uniform init; only the 1x1x1 heads and the
    spatial-attention conv have biases, and 0 is the neutral start for logits.) Linear layers keep PyTorch's
    default init, as in the reference.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.InstanceNorm3d, nn.BatchNorm3d)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
