"""Tests for brats_lightning/models/attention.py (CBAM, docs/method.md "Network" attention variant)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from brats_lightning.models.attention import CBAM, ChannelGate, SpatialGate, cbam_factory
from brats_lightning.models.blocks import Stage, group_norm


def test_channel_gate_matches_pooling_definition() -> None:
    torch.manual_seed(0)
    gate = ChannelGate(32)
    x = torch.randn(3, 32, 6, 4, 8)
    avg = F.adaptive_avg_pool3d(x, 1).flatten(1)
    mx = F.adaptive_max_pool3d(x, 1).flatten(1)
    expected = torch.sigmoid(gate.mlp(avg) + gate.mlp(mx))
    assert gate.mlp[0].out_features == 2  # C / 16
    torch.testing.assert_close(gate.gate(x).flatten(1), expected)
    torch.testing.assert_close(gate(x), x * expected[:, :, None, None, None])


def test_spatial_gate_matches_definition() -> None:
    torch.manual_seed(0)
    gate = SpatialGate()
    x = torch.randn(2, 5, 8, 6, 4)
    pooled = torch.stack([x.max(dim=1).values, x.mean(dim=1)], dim=1)
    expected = torch.sigmoid(F.conv3d(pooled, gate.conv.weight, gate.conv.bias, padding=3))
    assert gate.conv.weight.shape == (1, 2, 7, 7, 7)
    torch.testing.assert_close(gate.gate(x), expected)


def test_spatial_gate_ranges() -> None:
    torch.manual_seed(0)
    x = 5 * torch.randn(2, 8, 8, 8, 8)
    plain = SpatialGate().gate(x)
    assert plain.min() > 0 and plain.max() < 1
    assert plain.min() < 0.4 and plain.max() > 0.6  # spans both sides of 0.5
    squashed = SpatialGate(norm=group_norm, gate_norm=True).gate(x)
    assert squashed.min() >= 0.5 and squashed.max() < 1
    assert (squashed == 0.5).any() and squashed.max() > 0.6  # ReLU floor reached, and not constant


def test_cbam_is_channel_then_spatial() -> None:
    torch.manual_seed(0)
    cbam = CBAM(16)
    x = torch.randn(2, 16, 8, 8, 8)
    after_channel = x * cbam.channel_gate.gate(x)
    expected = after_channel * cbam.spatial_gate.gate(after_channel)
    torch.testing.assert_close(cbam(x), expected)
    assert cbam.channel_gate.mlp[0].out_features == 1  # max(1, 16 // 16)


def test_gates_ignore_memory_format() -> None:
    torch.manual_seed(0)
    cbam = CBAM(16)
    x = torch.randn(2, 16, 8, 6, 4)
    torch.testing.assert_close(cbam(x.contiguous(memory_format=torch.channels_last_3d)), cbam(x))


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_bf16_gradients_are_finite() -> None:
    # Regression: with amax reductions, inductor + bf16 autocast gave NaN input gradients for
    # conv -> GroupNorm -> ReLU -> CBAM (torch 2.13, CPU); eager was fine.
    torch.manual_seed(0)
    stage = Stage((128, 32), group_norm, attention=cbam_factory(group_norm))
    x = torch.randn(1, 128, 4, 4, 4)
    grads = []
    for module in (stage, torch.compile(stage)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        y.float().square().sum().backward()
        grads.append(xi.grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=0.1, atol=0.1)  # bf16: loose, but same gradient
