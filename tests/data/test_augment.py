"""Tests for brats_lightning/data/augment.py (docs/method.md "Augmentation")."""

from __future__ import annotations

import hydra.utils
import pytest
import torch

from brats_lightning.data.augment import BatchAugment, pipeline_a, pipeline_b


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


def test_pipeline_values_and_hydra() -> None:
    a, b = pipeline_a(), pipeline_b()
    assert (a.rescale_p, a.shift_p, a.noise_p, a.drop_channel_p, a.flip_p) == (0.8, 0.0, 1.0, 0.16, 0.8)
    assert (b.rescale_p, b.shift_p, b.noise_p, b.drop_channel_p, b.flip_p) == (0.2, 0.2, 1.0, 0.0, 0.5)
    for aug in (a, b):
        assert aug.rescale_range == (0.9, 1.1) and aug.shift_range == (-0.1, 0.1) and aug.noise_std == 0.1
    from_config = hydra.utils.instantiate(
        {
            "_target_": "brats_lightning.data.augment.BatchAugment",
            "rescale_p": 0.8, "rescale_range": [0.9, 1.1], "shift_p": 0.0, "shift_range": [-0.1, 0.1],
            "noise_p": 1.0, "noise_std": 0.1, "drop_channel_p": 0.16, "flip_p": 0.8,
        }
    )
    assert from_config.extra_repr() == a.extra_repr()


@pytest.mark.parametrize(
    "kwargs", [{"flip_p": 1.5}, {"noise_p": -0.1}, {"rescale_range": (1.1, 0.9)}, {"noise_std": -1.0}]
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="BatchAugment: got"):
        BatchAugment(**kwargs)


def test_mismatched_target() -> None:
    with pytest.raises(ValueError, match="same batch size and spatial shape"):
        BatchAugment(flip_p=0.5)(torch.zeros(2, 4, 8, 8, 8), torch.zeros(2, 3, 8, 8, 4))
