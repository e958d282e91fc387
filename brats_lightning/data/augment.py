"""Batched, per-sample data augmentation that runs on the tensors' device (GPU after the transfer).

Paper section 2.4 / docs/method.md "Augmentation". Every probability is drawn independently per sample (the
reference code shared one draw across the batch). Order: channel rescale, intensity shift, Gaussian noise,
channel drop, flips. Flips act on images and target alike; the other steps touch the images only.

Pipeline values (conf/pipeline/{A,B}.yaml, ``_target_: brats_lightning.data.augment.BatchAugment``):

| argument | A | B |
| --- | --- | --- |
| rescale_p (x U(0.9, 1.1) per channel) | 0.8 | 0.2 |
| shift_p (+ U(-0.1, 0.1) per channel) | 0.0 | 0.2 |
| noise_p (+ N(0, 0.1) per voxel) | 1.0 | 1.0 |
| drop_channel_p (one channel set to 0) | 0.16 | 0.0 |
| flip_p (each spatial axis) | 0.8 | 0.5 |

with ``rescale_range=(0.9, 1.1)``, ``shift_range=(-0.1, 0.1)``, ``noise_std=0.1`` in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _range(name: str, value: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"BatchAugment: got {name}={value!r}; expected [low, high] with low <= high")
    return values[0], values[1]


class BatchAugment(nn.Module):
    """Per-sample random augmentation of a batch (docs/method.md "Augmentation").

    Randomness comes from torch's global RNG of the tensors' device (seed with ``torch.manual_seed`` /
    Lightning's ``seed_everything``). A probability of 0 skips the step entirely (the input is returned
    unchanged, bit for bit, and no random numbers are drawn for it). Inputs are never modified in place.

    Args:
        rescale_p: probability, per sample, of multiplying each channel by its own factor from
            U(*rescale_range).
        rescale_range: (low, high) of the rescale factor.
        shift_p: probability, per sample, of adding to each channel its own constant from U(*shift_range).
        shift_range: (low, high) of the intensity shift.
        noise_p: probability, per sample, of adding i.i.d. N(0, noise_std^2) noise to every voxel
            (1.0 = always, the paper's "yes").
        noise_std: standard deviation of the noise.
        drop_channel_p: probability, per sample, of setting one input channel (uniformly chosen) to 0.
        flip_p: probability, per sample and per spatial axis independently, of flipping that axis.
    """

    def __init__(
        self,
        *,
        rescale_p: float = 0.0,
        rescale_range: Sequence[float] = (0.9, 1.1),
        shift_p: float = 0.0,
        shift_range: Sequence[float] = (-0.1, 0.1),
        noise_p: float = 0.0,
        noise_std: float = 0.1,
        drop_channel_p: float = 0.0,
        flip_p: float = 0.0,
    ) -> None:
        super().__init__()
        probabilities = {
            "rescale_p": rescale_p, "shift_p": shift_p, "noise_p": noise_p,
            "drop_channel_p": drop_channel_p, "flip_p": flip_p,
        }
        for name, p in probabilities.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"BatchAugment: got {name}={p}; expected a probability in [0, 1]")
        if noise_std < 0:
            raise ValueError(f"BatchAugment: got noise_std={noise_std}; expected >= 0")
        self.rescale_p = float(rescale_p)
        self.rescale_range = _range("rescale_range", rescale_range)
        self.shift_p = float(shift_p)
        self.shift_range = _range("shift_range", shift_range)
        self.noise_p = float(noise_p)
        self.noise_std = float(noise_std)
        self.drop_channel_p = float(drop_channel_p)
        self.flip_p = float(flip_p)

    def extra_repr(self) -> str:
        return (
            f"rescale_p={self.rescale_p}, rescale_range={self.rescale_range}, shift_p={self.shift_p}, "
            f"shift_range={self.shift_range}, noise_p={self.noise_p}, noise_std={self.noise_std}, "
            f"drop_channel_p={self.drop_channel_p}, flip_p={self.flip_p}"
        )

    @staticmethod
    def _draw(p: float, batch: int, device: torch.device) -> torch.Tensor:
        """Bool (B,): which samples get the augmentation."""
        return torch.rand(batch, device=device) < p

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

        if self.rescale_p > 0:
            apply = self._draw(self.rescale_p, b, device)
            factor = torch.empty(b, c, device=device, dtype=dtype).uniform_(*self.rescale_range)
            factor = torch.where(apply[:, None], factor, torch.ones_like(factor))
            images = images * factor.view(per_channel)
        if self.shift_p > 0:
            apply = self._draw(self.shift_p, b, device)
            shift = torch.empty(b, c, device=device, dtype=dtype).uniform_(*self.shift_range)
            shift = torch.where(apply[:, None], shift, torch.zeros_like(shift))
            images = images + shift.view(per_channel)
        if self.noise_p > 0:
            apply = self._draw(self.noise_p, b, device)
            noisy = images + torch.randn_like(images) * self.noise_std
            images = torch.where(apply.view(per_sample), noisy, images)
        if self.drop_channel_p > 0:
            apply = self._draw(self.drop_channel_p, b, device)
            channel = torch.randint(c, (b,), device=device)
            drop = (torch.arange(c, device=device)[None, :] == channel[:, None]) & apply[:, None]
            images = images.masked_fill(drop.view(per_channel), 0)
        if self.flip_p > 0:
            for axis in (2, 3, 4):
                flip = self._draw(self.flip_p, b, device).view(per_sample)
                images = torch.where(flip, images.flip(axis), images)
                if target is not None:
                    target = torch.where(flip, target.flip(axis), target)
        return images, target


def pipeline_a() -> BatchAugment:
    """Pipeline A's augmentation (docs/method.md table): rescale 80%, noise always, channel drop 16%, flips
    80%."""
    return BatchAugment(rescale_p=0.8, shift_p=0.0, noise_p=1.0, drop_channel_p=0.16, flip_p=0.8)


def pipeline_b() -> BatchAugment:
    """Pipeline B's augmentation (docs/method.md table): rescale 20%, shift 20%, noise always, flips 50%."""
    return BatchAugment(rescale_p=0.2, shift_p=0.2, noise_p=1.0, drop_channel_p=0.0, flip_p=0.5)
