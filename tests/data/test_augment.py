"""Tests for brats_lightning/data/augment.py (docs/method.md "Augmentation")."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from brats_lightning.data.augment import BatchAugment

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed_augment(*overrides: str) -> BatchAugment:
    """The augmentation training builds (``cfg.pipeline.augment`` of the composed train config)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return hydra.utils.instantiate(cfg.pipeline.augment)


def pipeline_a() -> BatchAugment:
    return composed_augment("pipeline=A")


def pipeline_b() -> BatchAugment:
    return composed_augment("pipeline=B")


def flips_of(images: torch.Tensor) -> torch.Tensor:
    """Bool (B, 3): which spatial axes were flipped, read off a batch built by :func:`probe`."""
    # probe() puts 4 * i + 2 * j + k at voxel (i, j, k) of a 2x2x2 grid, so the step along each axis is
    # +4 / +2 / +1 when that axis is unflipped and -4 / -2 / -1 when flipped.
    v = images[:, 0]
    steps = torch.stack(
        [v[:, 1, 0, 0] - v[:, 0, 0, 0], v[:, 0, 1, 0] - v[:, 0, 0, 0], v[:, 0, 0, 1] - v[:, 0, 0, 0]], dim=1
    )
    assert torch.equal(steps.abs(), torch.tensor([4.0, 2.0, 1.0]).expand_as(steps))
    return steps < 0


def probe(batch: int) -> torch.Tensor:
    return torch.arange(8.0).view(1, 1, 2, 2, 2).repeat(batch, 1, 1, 1, 1)


def test_zero_probabilities_leave_input_unchanged() -> None:
    torch.manual_seed(0)
    images = torch.randn(4, 4, 8, 8, 8)
    target = torch.rand(4, 3, 8, 8, 8) > 0.5
    state = torch.get_rng_state()
    out_images, out_target = BatchAugment(rescale_range=(0.5, 2.0), noise_std=1.0)(images, target)
    assert torch.equal(out_images, images) and torch.equal(out_target, target)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn


def test_flips_keep_image_and_target_consistent() -> None:
    torch.manual_seed(0)
    images = torch.rand(16, 4, 8, 6, 4)  # non-cubic: each axis flips on its own
    target = images[:, :3] > 0.5  # a deterministic rule, spatially aligned with the image
    out_images, out_target = BatchAugment(flip_p=0.5)(images, target)
    assert out_target.dtype == torch.bool
    assert torch.equal(out_target, out_images[:, :3] > 0.5)
    assert not torch.equal(out_images, images)  # something did flip
    # Each output sample is exactly one of the 8 flip combinations of its input.
    for b in range(16):
        candidates = [images[b]]
        for axis in (1, 2, 3):
            candidates += [c.flip(axis) for c in candidates]
        assert any(torch.equal(out_images[b], c) for c in candidates)


def test_full_pipeline_target_is_a_flip_of_the_input_target() -> None:
    torch.manual_seed(1)
    images = torch.rand(8, 4, 8, 8, 8)
    target = torch.rand(8, 3, 8, 8, 8) > 0.7
    _, out_target = pipeline_a()(images, target)
    for b in range(8):
        candidates = [target[b]]
        for axis in (1, 2, 3):
            candidates += [c.flip(axis) for c in candidates]
        assert any(torch.equal(out_target[b], c) for c in candidates)


def test_flips_are_drawn_per_sample_and_per_axis() -> None:
    torch.manual_seed(0)
    out, _ = BatchAugment(flip_p=0.5)(probe(64))
    flipped = flips_of(out)
    for axis in range(3):
        assert flipped[:, axis].any() and not flipped[:, axis].all()  # both outcomes within one batch
    assert not torch.equal(flipped[:, 0], flipped[:, 1])  # axes drawn independently


def test_flip_probability() -> None:
    torch.manual_seed(0)
    out, _ = BatchAugment(flip_p=0.8)(probe(2000))
    freq = flips_of(out).float().mean(dim=0)
    assert torch.all((freq - 0.8).abs() < 0.03), freq  # std of the estimate: sqrt(0.8 * 0.2 / 2000) = 0.009


def test_rescale_per_sample_and_channel() -> None:
    torch.manual_seed(0)
    out, _ = BatchAugment(rescale_p=1.0)(torch.ones(32, 4, 2, 2, 2))
    factors = out[:, :, 0, 0, 0]
    assert torch.equal(out, factors[:, :, None, None, None].expand_as(out))  # one factor per sample, channel
    assert factors.min() >= 0.9 and factors.max() <= 1.1
    assert factors.unique().numel() == 32 * 4


@pytest.mark.parametrize(
    ("kwargs", "p"),
    [
        ({"rescale_p": 0.8}, 0.8),
        ({"shift_p": 0.2}, 0.2),
        ({"noise_p": 0.5}, 0.5),
        ({"drop_channel_p": 0.16}, 0.16),
    ],
    ids=["rescale", "shift", "noise", "drop"],
)
def test_intensity_probabilities(kwargs: dict, p: float) -> None:
    torch.manual_seed(0)
    images = torch.ones(2000, 4, 2, 2, 2)
    out, _ = BatchAugment(**kwargs)(images)
    changed = (out != images).flatten(1).any(dim=1).float().mean().item()
    assert abs(changed - p) < 0.03, changed


def test_shift_range() -> None:
    torch.manual_seed(0)
    out, _ = BatchAugment(shift_p=1.0)(torch.zeros(64, 4, 2, 2, 2))
    shifts = out[:, :, 0, 0, 0]
    assert torch.equal(out, shifts[:, :, None, None, None].expand_as(out))
    assert shifts.min() >= -0.1 and shifts.max() <= 0.1 and shifts.unique().numel() == 64 * 4


def test_noise_statistics() -> None:
    torch.manual_seed(0)
    out, _ = BatchAugment(noise_p=1.0, noise_std=0.1)(torch.zeros(2, 4, 32, 32, 32))
    assert abs(out.mean().item()) < 0.001  # std of the mean: 0.1 / sqrt(262144) = 0.0002
    assert abs(out.std().item() - 0.1) < 0.001


def test_dropped_channel_is_all_zeros() -> None:
    torch.manual_seed(0)
    images = torch.rand(400, 4, 4, 4, 4) + 1.0  # strictly positive
    out, _ = BatchAugment(drop_channel_p=1.0)(images)
    zero = (out == 0).flatten(2).all(dim=2)  # (B, C): channel entirely zero
    assert torch.equal(zero.sum(dim=1), torch.ones(400, dtype=torch.long))  # exactly one per sample
    assert torch.equal(out[~zero], images[~zero])  # the other channels untouched
    counts = zero.sum(dim=0).float()
    assert torch.all((counts / 400 - 0.25).abs() < 0.07)  # the channel is uniform over the 4


def test_inputs_not_modified_in_place() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 4, 8, 8, 8)
    target = images[:, :3] > 0.5
    images_copy, target_copy = images.clone(), target.clone()
    pipeline_a()(images, target)
    pipeline_b()(images, target)
    assert torch.equal(images, images_copy) and torch.equal(target, target_copy)


@pytest.mark.parametrize(
    "kwargs", [{"flip_p": 1.5}, {"noise_p": -0.1}, {"rescale_range": (1.1, 0.9)}, {"noise_std": -1.0}]
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="BatchAugment: got"):
        BatchAugment(**kwargs)


def test_mismatched_target() -> None:
    with pytest.raises(ValueError, match="same batch size and spatial shape"):
        BatchAugment(flip_p=0.5)(torch.zeros(2, 4, 8, 8, 8), torch.zeros(2, 3, 8, 8, 4))


# ------------------------------------------------------------------ the authors' code (augment=authors)
def authors(*overrides: str) -> BatchAugment:
    return composed_augment("augment=authors", *overrides)


def signed_permutation(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source axis (B, 3), flipped (B, 3)) of each output axis, read off a transformed :func:`probe`.

    probe() holds 4 i + 2 j + k at voxel (i, j, k): along output axis a the value steps by +-4, +-2 or +-1,
    the weight of the input axis that landed there, negative when it was flipped.
    """
    v = target[:, 0]
    steps = torch.stack(
        [v[:, 1, 0, 0] - v[:, 0, 0, 0], v[:, 0, 1, 0] - v[:, 0, 0, 0], v[:, 0, 0, 1] - v[:, 0, 0, 0]], dim=1
    )
    source = {4.0: 0, 2.0: 1, 1.0: 2}
    axes = torch.tensor([[source[float(s)] for s in row] for row in steps.abs()])
    return axes, steps < 0


def test_authors_rates_one_draw_for_every_step() -> None:
    """4000 draws of the composed ``augment=authors``: 80% of samples get everything, 20% nothing; the
    spatial step is one transposition (uniform over the 3 axis pairs) and one flip (uniform over 3 axes)."""
    torch.manual_seed(0)
    n = 4000
    images = torch.rand(n, 4, 2, 2, 2) + 0.5  # positive: a dropped channel is the only all-zero one
    out, target = authors()(images, probe(n))
    axes, flipped = signed_permutation(target)
    augmented = (axes != torch.arange(3)).any(dim=1) | flipped.any(dim=1)
    assert abs(augmented.float().mean().item() - 0.8) < 0.025  # std of the estimate 0.0063
    # every augmented sample changed (noise), the others are untouched bit for bit
    changed = (out != images).flatten(1).any(dim=1)
    assert torch.equal(changed, augmented)
    # exactly one flip and exactly one swapped pair of axes in each augmented sample
    assert torch.equal(flipped.sum(dim=1), augmented.long())
    moved = (axes != torch.arange(3)).sum(dim=1)
    assert torch.equal(moved, 2 * augmented.long())
    for axis in range(3):  # flip of each output axis: 0.8 / 3 of all samples
        assert abs(flipped[:, axis].float().mean().item() - 0.8 / 3) < 0.025
        assert abs((axes[:, axis] == axis).float().mean().item() - (0.2 + 0.8 / 3)) < 0.025  # axis kept
    # one channel dropped in 20% of the augmented samples, never in the others
    dropped = (out == 0).flatten(2).all(dim=2).sum(dim=1)
    assert dropped.max() <= 1 and not dropped[~augmented].any()
    assert abs(dropped.float().mean().item() - 0.16) < 0.02  # 0.8 x 0.2; std 0.0058
    assert abs(dropped[augmented].float().mean().item() - 0.2) < 0.025


def test_authors_one_rescale_factor_for_all_channels() -> None:
    torch.manual_seed(0)
    n = 4000
    images = torch.rand(n, 4, 2, 2, 2) + 0.5
    aug = authors("pipeline.augment.noise_std=0", "pipeline.augment.drop_channel_p=0")
    out, target = aug(images, probe(n))
    factor = out.flatten(2).sum(dim=2) / images.flatten(2).sum(dim=2)  # transposes and flips keep sums
    assert torch.allclose(factor, factor[:, :1].expand_as(factor), rtol=1e-6)  # one factor per sample
    factor = factor[:, 0]
    axes, flipped = signed_permutation(target)
    augmented = flipped.any(dim=1)
    assert torch.allclose(factor[~augmented], torch.ones(1))
    rescaled = factor[augmented]
    assert rescaled.min() >= 0.9 - 1e-6 and rescaled.max() <= 1.1 + 1e-6
    assert abs(rescaled.mean().item() - 1.0) < 0.005  # U(0.9, 1.1): mean 1, std 0.2 / sqrt(12) = 0.0577
    assert abs(rescaled.std().item() - 0.2 / 12**0.5) < 0.004


def test_authors_noise_is_a_tenth_of_each_channels_std() -> None:
    """Noise of the composed ``augment=authors`` (spatial step and rescale switched off to compare voxel by
    voxel) against 0.1 x the std over each channel's positive voxels, computed here with numpy."""
    torch.manual_seed(0)
    n = 2000
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1, 1)
    images = (torch.rand(n, 4, 4, 4, 4) * scale).masked_fill(torch.rand(n, 1, 4, 4, 4) < 0.3, 0.0)
    aug = authors("pipeline.augment.flip_p=0", "pipeline.augment.rescale_range=[1,1]",
                  "pipeline.augment.drop_channel_p=0")
    out, _ = aug(images)
    noise = (out - images).double().numpy()
    values = images.double().numpy()
    augmented = (noise != 0).reshape(n, -1).any(axis=1)
    assert abs(augmented.mean() - 0.8) < 0.03
    ref_std = np.array([[v[v > 0].std(ddof=1) for v in sample] for sample in values])  # (n, 4)
    z = noise[augmented] / (0.1 * ref_std[augmented])[:, :, None, None, None]
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01  # 400k draws: std of the estimates ~0.002
    background = values[augmented] == 0
    assert (noise[augmented][background] != 0).all()  # the code adds noise to every voxel, background too
    # the paper's default is absolute N(0, 0.1) noise whatever the channel's spread
    paper, _ = BatchAugment(noise_p=1.0, noise_std=0.1)(images)
    assert abs((paper - images).std().item() - 0.1) < 0.002


def test_positive_std_without_positive_voxels_adds_no_noise() -> None:
    images = torch.zeros(2, 4, 4, 4, 4)
    images[0, 1, 0, 0, 0] = 1.0  # one positive voxel: no std
    out, _ = BatchAugment(noise_p=1.0, noise_relative=True)(images)
    assert torch.equal(out, images)


def test_transpose_flip_moves_image_and_target_together() -> None:
    torch.manual_seed(0)
    images = torch.rand(32, 4, 4, 4, 4)
    target = images[:, :3] > 0.5
    out_images, out_target = BatchAugment(flip_p=1.0, spatial="transpose_flip")(images, target)
    assert torch.equal(out_target, out_images[:, :3] > 0.5)
    for b in range(32):  # one of the 3 x 3 transpose-then-flip transforms of its input
        candidates = [images[b].transpose(*pair).flip(axis) for pair in ((1, 2), (1, 3), (2, 3))
                      for axis in (1, 2, 3)]
        assert any(torch.equal(out_images[b], c) for c in candidates)


def test_transpose_flip_needs_cubic_crops() -> None:
    with pytest.raises(ValueError, match="equal spatial sides"):
        BatchAugment(flip_p=1.0, spatial="transpose_flip")(torch.zeros(1, 4, 8, 8, 4))
    with pytest.raises(ValueError, match="spatial="):
        BatchAugment(spatial="rotate")
