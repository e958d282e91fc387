"""Batched, per-sample data augmentation that runs on the tensors' device (GPU after the transfer).

Paper section 2.4 / docs/method.md "Augmentation". Every probability is drawn independently per sample (the
authors' code shared one draw across the batch). Order: channel rescale, intensity shift, Gaussian noise,
channel drop, spatial step (flips, or a transpose and a flip). Spatial steps act on images and target alike;
the other steps touch the images only.

The paper's values are in conf/pipeline/{A,B}.yaml (``_target_: brats_lightning.data.augment.BatchAugment``;
tests/test_fidelity.py checks them against the docs/method.md table). ``augment=authors``
(conf/augment/authors.yaml) selects what the authors' code did instead (docs/fidelity.md): 80% of samples get
every step and 20% none (``sample_p``), one rescale factor for all channels, noise of 0.1 x each channel's
std over its positive voxels, a channel dropped in 20% of the augmented samples, and one random transpose of
two spatial axes followed by one flip (``spatial="transpose_flip"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SPATIAL_MODES = ("flips", "transpose_flip")


def _range(name: str, value: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"BatchAugment: got {name}={value!r}; expected [low, high] with low <= high")
    return values[0], values[1]


class BatchAugment(nn.Module):
    """Per-sample random augmentation of a batch (docs/method.md "Augmentation").

    Randomness comes from torch's global RNG of the tensors' device (seed with ``torch.manual_seed`` /
    Lightning's ``seed_everything``). A probability of 0 skips the step entirely (the input is returned
    unchanged, bit for bit, and no random numbers are drawn for it); so does ``sample_p=1`` for its own
    draw. Inputs are never modified in place.

    Args:
        rescale_p: probability, per sample, of multiplying the channels by factors from U(*rescale_range).
        rescale_range: (low, high) of the rescale factor.
        rescale_per_channel: True (paper): each channel its own factor; False (authors' code): one factor
            for all channels of a sample.
        shift_p: probability, per sample, of adding to each channel its own constant from U(*shift_range).
        shift_range: (low, high) of the intensity shift.
        noise_p: probability, per sample, of adding i.i.d. Gaussian noise to every voxel (1.0 = always, the
            paper's "yes").
        noise_std: standard deviation of the noise (``noise_relative`` False), or its ratio to each channel's
            std over the channel's positive voxels after the rescale (True, the authors' code: 0.1; a
            channel with fewer than 2 positive voxels gets no noise).
        noise_relative: see ``noise_std``.
        drop_channel_p: probability, per sample, of setting one input channel (uniformly chosen) to 0.
        flip_p: probability, per sample, of the spatial step: with ``spatial="flips"``, of flipping each
            spatial axis (drawn per axis); with ``"transpose_flip"``, of swapping two distinct spatial axes
            (uniform over the 3 pairs) and then flipping one axis (uniform over the 3); the latter needs
            equal spatial sides.
        spatial: ``"flips"`` (paper) or ``"transpose_flip"`` (authors' code).
        sample_p: probability, per sample, that any step applies at all; each step's own probability then
            applies within those samples (1.0, paper: every step independent; 0.8, authors' code).
    """

    def __init__(
        self,
        *,
        rescale_p: float = 0.0,
        rescale_range: Sequence[float] = (0.9, 1.1),
        rescale_per_channel: bool = True,
        shift_p: float = 0.0,
        shift_range: Sequence[float] = (-0.1, 0.1),
        noise_p: float = 0.0,
        noise_std: float = 0.1,
        noise_relative: bool = False,
        drop_channel_p: float = 0.0,
        flip_p: float = 0.0,
        spatial: str = "flips",
        sample_p: float = 1.0,
    ) -> None:
        super().__init__()
        probabilities = {
            "rescale_p": rescale_p, "shift_p": shift_p, "noise_p": noise_p,
            "drop_channel_p": drop_channel_p, "flip_p": flip_p, "sample_p": sample_p,
        }
        for name, p in probabilities.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"BatchAugment: got {name}={p}; expected a probability in [0, 1]")
        if noise_std < 0:
            raise ValueError(f"BatchAugment: got noise_std={noise_std}; expected >= 0")
        if spatial not in SPATIAL_MODES:
            raise ValueError(f"BatchAugment: got spatial={spatial!r}; expected one of {SPATIAL_MODES}")
        self.rescale_p = float(rescale_p)
        self.rescale_range = _range("rescale_range", rescale_range)
        self.shift_p = float(shift_p)
        self.shift_range = _range("shift_range", shift_range)
        self.noise_p = float(noise_p)
        self.noise_std = float(noise_std)
        self.drop_channel_p = float(drop_channel_p)
        self.flip_p = float(flip_p)
        self.rescale_per_channel = bool(rescale_per_channel)
        self.noise_relative = bool(noise_relative)
        self.spatial = spatial
        self.sample_p = float(sample_p)

    def extra_repr(self) -> str:
        return (
            f"rescale_p={self.rescale_p}, rescale_range={self.rescale_range}, "
            f"rescale_per_channel={self.rescale_per_channel}, shift_p={self.shift_p}, "
            f"shift_range={self.shift_range}, noise_p={self.noise_p}, noise_std={self.noise_std}, "
            f"noise_relative={self.noise_relative}, drop_channel_p={self.drop_channel_p}, "
            f"flip_p={self.flip_p}, spatial={self.spatial!r}, sample_p={self.sample_p}"
        )

    @staticmethod
    def _draw(p: float, batch: int, device: torch.device, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Bool (B,): which samples get the augmentation (only samples of ``gate`` when given)."""
        drawn = torch.rand(batch, device=device) < p
        return drawn if gate is None else drawn & gate

    @staticmethod
    def _positive_std(images: torch.Tensor) -> torch.Tensor:
        """(B, C) unbiased std of each sample's channel over its positive voxels (0 below 2 such voxels)."""
        positive = images > 0
        count = positive.flatten(2).sum(dim=2)
        values = torch.where(positive, images, torch.zeros_like(images)).flatten(2)
        mean = values.sum(dim=2) / count.clamp(min=1)
        squares = torch.where(positive.flatten(2), (values - mean[..., None]) ** 2, torch.zeros_like(values))
        variance = squares.sum(dim=2) / (count - 1).clamp(min=1)
        return torch.where(count >= 2, variance.sqrt(), torch.zeros_like(variance))

    def _transpose_flip(
        self, images: torch.Tensor, target: torch.Tensor | None, apply: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The authors' spatial step on the samples of ``apply``: swap two spatial axes, then flip one."""
        if len(set(images.shape[2:])) != 1:
            raise ValueError(
                f"BatchAugment: got images of shape {tuple(images.shape)}; spatial='transpose_flip' needs "
                "equal spatial sides (cubic crops: data.crop_size one int)"
            )
        b = images.shape[0]
        pairs = ((2, 3), (1, 3), (1, 2))  # spatial axes of one sample (C, X, Y, Z)
        pair = torch.randint(len(pairs), (b,), device=images.device).tolist()
        flip = torch.randint(3, (b,), device=images.device).tolist()
        chosen = apply.tolist()

        def one(tensor: torch.Tensor, i: int) -> torch.Tensor:
            if not chosen[i]:
                return tensor[i]
            return tensor[i].transpose(*pairs[pair[i]]).flip(flip[i] + 1)

        images = torch.stack([one(images, i) for i in range(b)])
        if target is not None:
            target = torch.stack([one(target, i) for i in range(b)])
        return images, target

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch.

        Args:
            images: (B, C, X, Y, Z) float images.
            target: (B, K, X, Y, Z) regions (any dtype) with the same spatial shape, or None.

        Returns:
            ``(images, target)``, new tensors (the inputs are left untouched).
        """
        if images.ndim != 5:
            raise ValueError(
                f"BatchAugment: got images of shape {tuple(images.shape)}; expected (B, C, X, Y, Z)"
            )
        if target is not None and (
            target.ndim != 5 or target.shape[0] != images.shape[0] or target.shape[2:] != images.shape[2:]
        ):
            raise ValueError(
                f"BatchAugment: images {tuple(images.shape)} and target {tuple(target.shape)} differ; "
                "expected the same batch size and spatial shape (B, *, X, Y, Z)"
            )
        b, c = images.shape[:2]
        device, dtype = images.device, images.dtype
        per_sample = (b, 1, 1, 1, 1)
        per_channel = (b, c, 1, 1, 1)
        gate = self._draw(self.sample_p, b, device) if self.sample_p < 1 else None

        if self.rescale_p > 0:
            apply = self._draw(self.rescale_p, b, device, gate)
            factor = torch.empty(b, c if self.rescale_per_channel else 1, device=device, dtype=dtype)
            factor = factor.uniform_(*self.rescale_range).expand(b, c)
            factor = torch.where(apply[:, None], factor, torch.ones_like(factor))
            images = images * factor.reshape(per_channel)
        if self.shift_p > 0:
            apply = self._draw(self.shift_p, b, device, gate)
            shift = torch.empty(b, c, device=device, dtype=dtype).uniform_(*self.shift_range)
            shift = torch.where(apply[:, None], shift, torch.zeros_like(shift))
            images = images + shift.view(per_channel)
        if self.noise_p > 0:
            apply = self._draw(self.noise_p, b, device, gate)
            std = self.noise_std
            if self.noise_relative:
                std = (self._positive_std(images) * self.noise_std).view(per_channel)
            noisy = images + torch.randn_like(images) * std
            images = torch.where(apply.view(per_sample), noisy, images)
        if self.drop_channel_p > 0:
            apply = self._draw(self.drop_channel_p, b, device, gate)
            channel = torch.randint(c, (b,), device=device)
            drop = (torch.arange(c, device=device)[None, :] == channel[:, None]) & apply[:, None]
            images = images.masked_fill(drop.view(per_channel), 0)
        if self.flip_p > 0 and self.spatial == "transpose_flip":
            images, target = self._transpose_flip(images, target, self._draw(self.flip_p, b, device, gate))
        elif self.flip_p > 0:
            for axis in (2, 3, 4):
                flip = self._draw(self.flip_p, b, device, gate).view(per_sample)
                images = torch.where(flip, images.flip(axis), images)
                if target is not None:
                    target = torch.where(flip, target.flip(axis), target)
        return images, target

