"""Tests for brats_lightning/losses.py (docs/method.md "Loss"), against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from brats_lightning.losses import DeepSupervisionLoss, DiceLoss


def zero_logits_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2, 3 channels, 2 voxels each; logits 0 -> S = 0.5 everywhere (4 voxels per channel).

    Target: ET empty; TC one positive voxel (sample 0, voxel 0); WT all 4 voxels positive.
    """
    logits = torch.zeros(2, 3, 1, 1, 2)
    target = torch.zeros(2, 3, 1, 1, 2)
    target[0, 1, 0, 0, 0] = 1
    target[:, 2] = 1
    return logits, target


def test_squared_hand_computed() -> None:
    # sum(S^2) = 4 * 0.25 = 1 per channel.
    # ET: inter 0,   sum(R^2) 0 -> dice (0 + 1) / (1 + 0 + 1) = 1/2 -> loss 1/2
    # TC: inter 0.5, sum(R^2) 1 -> dice (1 + 1) / (1 + 1 + 1) = 2/3 -> loss 1/3
    # WT: inter 2,   sum(R^2) 4 -> dice (4 + 1) / (1 + 4 + 1) = 5/6 -> loss 1/6
    logits, target = zero_logits_case()
    loss = DiceLoss(squared=True)
    torch.testing.assert_close(loss.channel_losses(logits, target), torch.tensor([1 / 2, 1 / 3, 1 / 6]))
    assert math.isclose(loss(logits, target).item(), (1 / 2 + 1 / 3 + 1 / 6) / 3, rel_tol=1e-6)


def test_plain_hand_computed() -> None:
    # sum(S) = 4 * 0.5 = 2 per channel.
    # ET: dice (0 + 1) / (2 + 0 + 1) = 1/3 -> loss 2/3
    # TC: dice (1 + 1) / (2 + 1 + 1) = 1/2 -> loss 1/2
    # WT: dice (4 + 1) / (2 + 4 + 1) = 5/7 -> loss 2/7
    logits, target = zero_logits_case()
    loss = DiceLoss(squared=False)
    torch.testing.assert_close(loss.channel_losses(logits, target), torch.tensor([2 / 3, 1 / 2, 2 / 7]))
    assert math.isclose(loss(logits, target).item(), 61 / 126, rel_tol=1e-6)  # (28 + 21 + 12) / 42 / 3


def test_sums_over_batch_not_mean_of_samples() -> None:
    # TC per sample (squared): sample 0 has 1 positive: inter 0.5, denom 0.5 + 1 -> (1 + 1) / 2.5 = 0.8;
    # sample 1 is empty: (0 + 1) / (0.5 + 0 + 1) = 2/3. Their mean (0.733) is not the batch value 2/3.
    logits, target = zero_logits_case()
    per_sample = DiceLoss(squared=True).per_sample(logits, target)
    assert per_sample.shape == (2, 3)
    torch.testing.assert_close(per_sample[:, 1], torch.tensor([1 - 0.8, 1 - 2 / 3]))


def test_sigmoid_values() -> None:
    # logits +-ln 3 -> S = 3/4 and 1/4; target [1, 0]. inter = 3/4.
    # squared: denom 9/16 + 1/16 + 1 = 13/8; dice (3/2 + 1) / (13/8 + 1) = 20/21 -> loss 1/21
    # plain:   denom 1 + 1 = 2;             dice (3/2 + 1) / (2 + 1)    = 5/6   -> loss 1/6
    logits = torch.tensor([math.log(3), -math.log(3)]).view(1, 1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    assert math.isclose(DiceLoss(squared=True)(logits, target).item(), 1 / 21, rel_tol=1e-5)
    assert math.isclose(DiceLoss(squared=False)(logits, target).item(), 1 / 6, rel_tol=1e-5)


def test_eps() -> None:
    # eps = 0, zero logits, WT (4 positives): squared 4 / (1 + 4) -> loss 1/5; plain 4 / (2 + 4) -> loss 1/3.
    logits, target = zero_logits_case()
    squared = DiceLoss(True, eps=0.0).channel_losses(logits, target)
    plain = DiceLoss(False, eps=0.0).channel_losses(logits, target)
    assert math.isclose(squared[2].item(), 1 / 5, rel_tol=1e-6)
    assert math.isclose(plain[2].item(), 1 / 3, rel_tol=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_perfect_prediction_is_zero_thanks_to_the_2(squared: bool) -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 8, 8) > 0.5
    logits = torch.where(target, 30.0, -30.0)  # S = 1 on R, ~1e-13 elsewhere
    assert DiceLoss(squared)(logits, target).item() < 1e-6
    # Without the 2 (the paper's printed equation) the same prediction would score about 1/2:
    s, r = torch.sigmoid(logits), target.float()
    n = r[:, 0].sum()
    without_2 = 1 - (s[:, 0] * r[:, 0]).sum() / (n + n + 1) - 1 / (2 * n + 1)
    assert abs(without_2.item() - 0.5) < 0.01


def test_bool_target_same_as_float() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.rand(2, 3, 4, 4, 4) > 0.5
    loss = DiceLoss(squared=True)
    assert loss(logits, target).item() == loss(logits, target.float()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_inside_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 3, 1)
    x = torch.randn(2, 4, 8, 8, 8)
    target = torch.rand(2, 3, 8, 8, 8) > 0.5
    with torch.autocast("cpu", dtype=dtype):
        logits = conv(x)
        assert logits.dtype == dtype
        value = DiceLoss(squared=True)(logits, target)
    assert value.dtype == torch.float32
    reference = DiceLoss(squared=True)(logits.float(), target)  # outside autocast, same (rounded) logits
    assert value.item() == reference.item()


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4, 4\).*\(1, 2, 4, 4, 4\)"):
        DiceLoss(True)(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_deep_supervision_sum() -> None:
    # main: zero logits -> 1/3 (test_squared_hand_computed); deeps: 3 more zero maps (1/3 each) and one
    # perfect map (0): total 4/3.
    logits, target = zero_logits_case()
    perfect = torch.where(target > 0, 30.0, -30.0)
    loss = DeepSupervisionLoss(DiceLoss(squared=True))
    total = loss((logits, [logits.clone(), perfect, logits.clone(), logits.clone()]), target)
    assert math.isclose(total.item(), 4 / 3, rel_tol=1e-5)
    assert math.isclose(loss(logits, target).item(), 1 / 3, rel_tol=1e-6)  # a plain tensor: the base loss
    with pytest.raises(TypeError, match="expected a logits tensor"):
        loss([logits, logits, logits], target)


def test_runs_on_a_device_without_autocast() -> None:
    # The meta device (shape-only tensors, used for FLOP counting) has no autocast to disable.
    logits = torch.empty(1, 3, 8, 8, 8, device="meta")
    value = DiceLoss(squared=False)(logits, torch.empty(1, 3, 8, 8, 8, device="meta", dtype=torch.bool))
    assert value.device.type == "meta" and value.dtype == torch.float32 and value.shape == ()


def authors_edice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' EDiceLoss (src/loss/dice.py) re-typed: per channel 1 - (2 I + 1) / (sum S^2 + sum R^2 + 1)
    over the whole batch, then the mean over the channels."""
    total = 0.0
    for c in range(target.shape[1]):
        s, r = torch.sigmoid(logits[:, c].double()), target[:, c].double()
        total = total + 1 - (2 * (s * r).sum() + 1) / (s.pow(2).sum() + r.pow(2).sum() + 1)
    return total / target.shape[1]


def test_deep_supervision_mean_is_the_authors_torch_mean() -> None:
    """reduction="mean" (experiment=paper_A_code): torch.mean of the 5 losses as the authors' training step
    computed it, i.e. the paper's sum / 5."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 4, 4, 4, generator=gen) > 0.6
    logits = torch.randn(2, 3, 4, 4, 4, generator=gen)
    deeps = [torch.randn(2, 3, 4, 4, 4, generator=gen) for _ in range(4)]
    expected = torch.mean(torch.stack([authors_edice(o, target) for o in (logits, *deeps)]))
    mean = DeepSupervisionLoss(DiceLoss(squared=True), reduction="mean")((logits, deeps), target)
    total = DeepSupervisionLoss(DiceLoss(squared=True))((logits, deeps), target)
    assert mean.item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.item() == pytest.approx(5 * mean.item(), rel=1e-6)  # the paper's sum is 5x the code's mean
    plain = DeepSupervisionLoss(DiceLoss(squared=True), reduction="mean")(logits, target)
    assert plain.item() == pytest.approx(authors_edice(logits, target).item(), rel=1e-6)  # no deep heads
    with pytest.raises(ValueError, match="deep_reduction"):
        DeepSupervisionLoss(DiceLoss(squared=True), reduction="max")
