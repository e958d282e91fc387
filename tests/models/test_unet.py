"""Tests for brats_lightning/models/unet.py (docs/method.md "Network")."""

from __future__ import annotations

import functools
import math

import hydra.utils
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from brats_lightning.losses import DeepSupervisionLoss, DiceLoss
from brats_lightning.models import AttEquiUnet, EquiUnet, Unet
from brats_lightning.models.blocks import group_norm, instance_norm

NETWORKS = [EquiUnet, Unet, AttEquiUnet]
NORMS = {"group": group_norm, "instance": instance_norm}


# ---- independent parameter arithmetic (w = 48, 4 inputs, 3 outputs) -------------------------------------
# A block is Conv3d 3x3x3 without bias (27 * c_in * c_out weights) + an affine norm
# (weight + bias = 2 * c_out).
# A 1x1x1 head with bias has c_in * 3 + 3 parameters.


def block(c_in: int, c_out: int) -> int:
    return 27 * c_in * c_out + 2 * c_out


def head(c_in: int) -> int:
    return c_in * 3 + 3


def cbam(c: int, gate_norm: bool = False) -> int:
    hidden = c // 16  # 48 -> 3, 96 -> 6, 192 -> 12, 384 -> 24
    mlp = (c * hidden + hidden) + (hidden * c + c)  # Linear(C, C/16) and Linear(C/16, C), both with bias
    spatial = 2 * 7 * 7 * 7 + (2 if gate_norm else 1)  # 7^3 conv 2 -> 1; + bias, or + norm(1) weight and bias
    return mlp + spatial


EQUIUNET_48 = {
    "encoder1": block(4, 48) + block(48, 48),
    "encoder2": block(48, 96) + block(96, 96),
    "encoder3": block(96, 192) + block(192, 192),
    "encoder4": block(192, 384) + block(384, 384),
    "bottom": block(384, 384) + block(384, 384),  # dilation 2, same parameters
    "bottom_2": block(768, 192),  # [encoder4, bottom] = 16w -> 4w
    "decoder3": block(384, 192) + block(192, 96),  # [skip 4w, up 4w] = 8w -> 4w -> 2w
    "decoder2": block(192, 96) + block(96, 48),  # 4w -> 2w -> w
    "decoder1": block(96, 48) + block(48, 48),  # 2w -> w -> w
    "head": head(48),
    "deep_bottom": head(384),
    "deep_bottom_2": head(192),
    "deep3": head(96),
    "deep2": head(48),
}

UNET_48 = dict(
    EQUIUNET_48,
    encoder1=block(4, 24) + block(24, 48),  # first conv of each encoder stage at half width
    encoder2=block(48, 48) + block(48, 96),
    encoder3=block(96, 96) + block(96, 192),
    encoder4=block(192, 192) + block(192, 384),
    decoder1=block(96, 48) + block(48, 24),  # last stage ends at w/2
    head=head(24),
)


def att_equiunet_48(gate_norm: bool) -> dict[str, int]:
    counts = dict(EQUIUNET_48)
    for name, c in [("encoder1", 48), ("encoder2", 96), ("encoder3", 192), ("encoder4", 384),
                    ("bottom", 384), ("bottom_2", 192)]:
        counts[name] += cbam(c, gate_norm)
    return counts


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (EquiUnet, {}, EQUIUNET_48),
        (Unet, {}, UNET_48),
        (AttEquiUnet, {}, att_equiunet_48(gate_norm=False)),
        (AttEquiUnet, {"gate_norm": True}, att_equiunet_48(gate_norm=True)),
    ],
    ids=["EquiUnet", "Unet", "AttEquiUnet", "AttEquiUnet-gate_norm"],
)
def test_parameter_counts_w48(cls: type[nn.Module], kwargs: dict, expected: dict[str, int]) -> None:
    net = cls(width=48, **kwargs)
    for name, count in expected.items():
        assert n_params(net.get_submodule(name)) == count, name
    assert n_params(net) == sum(expected.values())


def test_unet_w48_with_the_authors_groups() -> None:
    """model=unet in experiment=paper_A_code (``pipeline.norm.rule: authors``): the 24-channel layers get 3
    groups of 8 as in the authors' code, every other GroupNorm 16; the parameters are those counted layer
    by layer in UNET_48; a forward pass normalizes encoder1's first block over 3 groups."""
    torch.manual_seed(0)
    net = Unet(width=48, norm=functools.partial(group_norm, groups=16, rule="authors"))
    for name, count in UNET_48.items():
        assert n_params(net.get_submodule(name)) == count, name
    assert n_params(net) == sum(UNET_48.values())
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert {(m.num_channels, m.num_groups) for m in norms if m.num_channels == 24} == {(24, 3)}
    assert {m.num_groups for m in norms if m.num_channels != 24} == {16}
    assert sum(m.num_channels == 24 for m in norms) == 2  # encoder1.block1 and decoder1.block2
    x = torch.randn(1, 4, 8, 8, 8)
    net.eval()
    with torch.no_grad():
        out = net(x)
        block = net.encoder1.block1
        expected = torch.relu(nn.functional.group_norm(block.conv(x), 3, block.norm.weight, block.norm.bias))
        torch.testing.assert_close(block(x), expected)
        gcd = nn.functional.group_norm(block.conv(x), 8, block.norm.weight, block.norm.bias)
        assert not torch.allclose(torch.relu(gcd), expected)  # the grouping changes the activations
    assert out.shape == (1, 3, 8, 8, 8) and torch.isfinite(out).all()


def test_deep_outputs_in_eval_mode() -> None:
    """``deep_outputs=True``: the deep logits in eval mode too (the authors' validation loss), equal to the
    training-mode ones (GroupNorm has no running statistics)."""
    torch.manual_seed(0)
    net = EquiUnet(width=4)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        logits, deeps = net.eval()(x, deep_outputs=True)
        train_logits, train_deeps = net.train()(x)
        assert isinstance(net(x, deep_outputs=False), torch.Tensor)
    torch.testing.assert_close(logits, train_logits)
    for deep, train_deep in zip(deeps, train_deeps, strict=True):
        torch.testing.assert_close(deep, train_deep)
    with pytest.raises(ValueError, match="deep_supervision"):
        EquiUnet(width=4, deep_supervision=False)(x, deep_outputs=True)


def test_equiunet_w48_matches_measured_anchor() -> None:
    total = sum(EQUIUNET_48.values())
    assert total == 23_154_735
    assert math.isclose(total / 1e6, 23.15, abs_tol=0.005)  # docs/method.md "Measured anchors"
    assert n_params(EquiUnet(width=48)) == total
    # InstanceNorm(affine) has as many parameters as GroupNorm; no deep heads -> 4 heads fewer.
    assert n_params(EquiUnet(width=48, norm=instance_norm)) == total
    deep = sum(EQUIUNET_48[k] for k in ("deep_bottom", "deep_bottom_2", "deep3", "deep2"))
    assert n_params(EquiUnet(width=48, deep_supervision=False)) == total - deep


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
@pytest.mark.parametrize("cls", NETWORKS, ids=lambda c: c.__name__)
def test_output_shapes_train_and_eval(cls: type[nn.Module], norm) -> None:
    torch.manual_seed(0)
    net = cls(width=4, norm=norm)
    x = torch.randn(2, 4, 16, 24, 32)
    net.train()
    logits, deeps = net(x)
    assert logits.shape == (2, 3, 16, 24, 32)
    assert len(deeps) == 4
    assert all(d.shape == (2, 3, 16, 24, 32) for d in deeps)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 24, 32)


def test_norm_injection() -> None:
    assert any(isinstance(m, nn.GroupNorm) for m in EquiUnet(width=4).modules())
    net = EquiUnet(width=4, norm=instance_norm)
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in net.modules()) == 17  # 8 + 2 + 1 + 6 blocks


def test_hydra_partial_norm() -> None:
    net = hydra.utils.instantiate(
        {
            "_target_": "brats_lightning.models.EquiUnet",
            "width": 8,
            "norm": {"_target_": "brats_lightning.models.blocks.instance_norm", "_partial_": True},
        }
    )
    assert isinstance(net.encoder1.block1.norm, nn.InstanceNorm3d)
    net = hydra.utils.instantiate(
        {
            "_target_": "brats_lightning.models.Unet",
            "width": 32,
            "norm": {"_target_": "brats_lightning.models.blocks.group_norm", "groups": 8, "_partial_": True},
        }
    )
    assert net.encoder1.block1.norm.num_groups == 8  # 16 channels, 8 groups asked
    assert net.decoder1.block2.norm.num_groups == 8


def test_no_deep_supervision_returns_logits_in_training() -> None:
    net = EquiUnet(width=4, deep_supervision=False).train()
    out = net(torch.randn(1, 4, 16, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 16, 16, 16)
    assert not hasattr(net, "deep_bottom")


@pytest.mark.parametrize("shape", [(1, 4, 20, 16, 16), (1, 4, 16, 16, 12)])
def test_side_not_multiple_of_8(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="multiple of 8") as err:
        EquiUnet(width=4)(torch.randn(shape))
    assert str(shape) in str(err.value) and "pad_to_multiple" in str(err.value)


def test_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"expected \(B, 4, X, Y, Z\)"):
        EquiUnet(width=4)(torch.randn(1, 3, 16, 16, 16))


def test_unet_odd_width_rejected() -> None:
    with pytest.raises(ValueError, match="even width"):
        Unet(width=5)


@pytest.mark.parametrize("cls", NETWORKS, ids=lambda c: c.__name__)
def test_gradient_reaches_every_parameter(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    kwargs = {"gate_norm": True} if cls is AttEquiUnet else {}
    net = cls(width=4, **kwargs).train()
    # A channel-MLP hidden unit (C/16 -> a single unit at width 4) can be ReLU-inactive for every input at
    # init, as in any CBAM; lift its bias so this test checks the graph's connectivity, not init luck.
    for name, m in net.named_modules():
        if name.endswith("channel_gate.mlp.0"):
            nn.init.constant_(m.bias, 1.0)
    x = torch.randn(2, 4, 16, 16, 16)
    target = torch.rand(2, 3, 16, 16, 16) > 0.5
    DeepSupervisionLoss(DiceLoss(squared=True))(net(x), target).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_init() -> None:
    torch.manual_seed(0)
    net = EquiUnet(width=48)
    w = net.bottom.block1.conv.weight  # 384 -> 384, 3x3x3: fan_out = 384 * 27
    assert math.isclose(w.std().item(), math.sqrt(2 / (384 * 27)), rel_tol=0.01)
    assert abs(w.mean().item()) < 1e-4
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Conv3d):
            assert (m.bias is None) == (m.kernel_size == (3, 3, 3))  # only the 1x1x1 heads have biases
            if m.bias is not None:
                assert torch.all(m.bias == 0)


def test_equiunet_w48_flops_match_stage_resolutions() -> None:
    # Forward FLOPs at 128^3 (eval mode: no deep heads), from each conv's multiply-adds at its resolution:
    # 2 * 27 * c_in * c_out * voxels for a 3x3x3 conv, 2 * c_in * 3 * voxels for the head. This checks what
    # the parameter counts can't: that every stage runs at the right resolution (bottom at 1/8, not 1/16).
    full, half, quarter, eighth = 128**3, 64**3, 32**3, 16**3
    macs = (
        full * 27 * (4 * 48 + 48 * 48)  # encoder1
        + half * 27 * (48 * 96 + 96 * 96)  # encoder2
        + quarter * 27 * (96 * 192 + 192 * 192)  # encoder3
        + eighth * 27 * (192 * 384 + 384 * 384)  # encoder4
        + eighth * 27 * (384 * 384 + 384 * 384)  # bottom (dilated, same resolution)
        + eighth * 27 * (768 * 192)  # bottom_2
        + quarter * 27 * (384 * 192 + 192 * 96)  # decoder3
        + half * 27 * (192 * 96 + 96 * 48)  # decoder2
        + full * 27 * (96 * 48 + 48 * 48)  # decoder1
        + full * 48 * 3  # head
    )
    with torch.device("meta"):
        net = EquiUnet(width=48).eval()
        x = torch.empty(1, 4, 128, 128, 128)
    with FlopCounterMode(display=False) as counter:
        net(x)
    assert counter.get_total_flops() == 2 * macs
    assert math.isclose(2 * macs / 1e12, 2.0, rel_tol=0.005)  # docs/method.md anchor: forward 2.0 TFLOP
