"""Tests for brats_lightning/models/blocks.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brats_lightning.models.blocks import ConvNormAct, Stage, group_norm, instance_norm


@pytest.mark.parametrize(("channels", "groups"), [(48, 16), (384, 16), (24, 8), (8, 8), (2, 2), (1, 1)])
def test_group_norm_groups(channels: int, groups: int) -> None:
    norm = group_norm(channels)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_channels, norm.num_groups) == (channels, groups)


def test_group_norm_rejects_zero_channels() -> None:
    with pytest.raises(ValueError, match="num_channels=0"):
        group_norm(0)


def test_instance_norm_affine() -> None:
    norm = instance_norm(6)
    assert isinstance(norm, nn.InstanceNorm3d) and norm.affine and not norm.track_running_stats


def test_conv_norm_act_dilation_keeps_size() -> None:
    block = ConvNormAct(3, 5, group_norm, dilation=2)
    assert block.conv.padding == (2, 2, 2) and block.conv.bias is None
    out = block(torch.randn(1, 3, 8, 8, 8))
    assert out.shape == (1, 5, 8, 8, 8) and out.min() >= 0


def test_stage_widths_and_attention() -> None:
    stage = Stage((4, 6, 8), group_norm, attention=lambda c: nn.Linear(c, c))
    assert [name for name, _ in stage.named_children()] == ["block1", "block2", "attention"]
    assert stage.block1.conv.out_channels == 6 and stage.block2.conv.out_channels == 8
    assert stage.attention.in_features == 8
    with pytest.raises(ValueError, match="expected"):
        Stage((4,), group_norm)


def code_default_norm_layer_groups(planes: int, groups: int = 16) -> int:
    """The authors' ``default_norm_layer`` (src/models/layers.py) re-typed line by line (float divisor)."""
    groups_ = min(groups, planes)
    if planes % groups_ > 0:
        divisor = 16
        while planes % divisor > 0:
            divisor /= 2
        groups_ = int(planes // divisor)
    return groups_


def test_authors_group_rule_is_the_codes() -> None:
    for channels in range(1, 400):
        norm = group_norm(channels, rule="authors")
        assert norm.num_groups == code_default_norm_layer_groups(channels), channels
    assert [group_norm(c, rule="authors").num_groups for c in (24, 12, 40, 48, 1)] == [3, 12, 5, 16, 1]
    assert [group_norm(c).num_groups for c in (24, 12, 40, 48, 1)] == [8, 4, 8, 16, 1]  # gcd, the default
    with pytest.raises(ValueError, match="rule"):
        group_norm(24, rule="nearest")
