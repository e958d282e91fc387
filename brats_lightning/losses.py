"""Soft Dice losses (squared / plain denominator) and the deep-supervision sum (or mean).

Paper section 2.2, equation (2) / docs/method.md "Loss". Per region channel (ET, TC, WT), sums run over the
batch
and all voxels; the loss is the mean over channels of

    squared (pipeline A): 1 - (2 * sum(S * R) + eps) / (sum(S^2) + sum(R^2) + eps)
    plain   (pipeline B): 1 - (2 * sum(S * R) + eps) / (sum(S) + sum(R) + eps)

with S = sigmoid(logits), R the binary target and eps = 1. The paper's equation drops the 2 of the
numerator; the reference code has it, and without it a perfect prediction can't reach 0, so it is kept.
The loss is computed in float32 with autocast disabled, even inside a bf16 / fp16 autocast region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn


class DiceLoss(nn.Module):
    """Soft Dice loss over region channels (docs/method.md "Loss").

    Args:
        squared: True for the squared denominator (pipeline A), False for the plain one (pipeline B).
        eps: smoothing added to numerator and denominator (1.0).
    """

    def __init__(self, squared: bool, eps: float = 1.0) -> None:
        super().__init__()
        self.squared = squared
        self.eps = eps

    def extra_repr(self) -> str:
        return f"squared={self.squared}, eps={self.eps}"

    def _dice(self, logits: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(
                f"DiceLoss: logits of shape {tuple(logits.shape)} and target of shape {tuple(target.shape)}; "
                "expected equal shapes (B, C, X, Y, Z) with C region channels (ET, TC, WT)"
            )
        device_type = logits.device.type
        no_autocast = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()  # e.g. the meta device (FLOP counting), which has no autocast
        )
        with no_autocast:
            s = torch.sigmoid(logits.float())
            r = target.float()
            intersection = (s * r).sum(dims)
            if self.squared:
                denominator = (s * s).sum(dims) + (r * r).sum(dims)
            else:
                denominator = s.sum(dims) + r.sum(dims)
            return (2.0 * intersection + self.eps) / (denominator + self.eps)

    def channel_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss per channel, float32 shape (C,), summing over batch and voxels (useful for logging)."""
        dims = (0, *range(2, logits.ndim))
        return 1.0 - self._dice(logits, target, dims)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss per sample and channel, float32 shape (B, C), summing over voxels only (per-case losses)."""
        return 1.0 - self._dice(logits, target, tuple(range(2, logits.ndim)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar float32 loss: mean over channels of the per-channel Dice loss.

        Args:
            logits: (B, C, X, Y, Z) raw network outputs (any float dtype).
            target: (B, C, X, Y, Z) binary regions (bool or float).
        """
        return self.channel_losses(logits, target).mean()


DEEP_REDUCTIONS = ("sum", "mean")


class DeepSupervisionLoss(nn.Module):
    """Unweighted sum (or mean) of ``base`` over the main logits and each deep-supervision logit map.

    Args:
        base: the per-output loss, e.g. ``DiceLoss(squared=True)``.
        reduction: ``"sum"`` (paper section 2.2: "the unweighted sum") or ``"mean"`` (the authors' code,
            ``torch.mean`` of the 5 losses: 1/5 of the sum with 4 deep heads; docs/fidelity.md). A plain
            logits tensor gives ``base`` alone either way.
    """

    def __init__(self, base: nn.Module, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in DEEP_REDUCTIONS:
            raise ValueError(f"DeepSupervisionLoss: got reduction={reduction!r}; expected one of "
                             f"{DEEP_REDUCTIONS} (pipeline.loss.deep_reduction)")
        self.base = base
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def forward(
        self,
        output: torch.Tensor | tuple[torch.Tensor, Sequence[torch.Tensor]],
        target: torch.Tensor,
    ) -> torch.Tensor:
        """``base(logits, target) + sum(base(deep, target) for deep in deeps)``, divided by
        ``1 + len(deeps)`` with ``reduction="mean"``.

        Args:
            output: logits, or the network's training output ``(logits, [deep logits])``.
            target: (B, C, X, Y, Z) binary regions.
        """
        if isinstance(output, torch.Tensor):
            return self.base(output, target)
        pair = isinstance(output, (tuple, list)) and len(output) == 2
        if not (pair and isinstance(output[1], (list, tuple))):
            raise TypeError(
                f"DeepSupervisionLoss: got output of type {type(output).__name__}; expected a logits tensor "
                "or the tuple (logits, [deep logits]) that the networks return in training mode"
            )
        logits, deeps = output
        loss = self.base(logits, target)
        for deep in deeps:
            loss = loss + self.base(deep, target)
        return loss / (1 + len(deeps)) if self.reduction == "mean" else loss
