"""Test-time augmentation: the 16 distinct axial views and their exact inverses (docs/method.md, Inference).

The paper (section 2.6, "First step") averages 16 views per model: {no flip, flip along one of the
3 axes} x {0, 1, 2, 3 quarter-turns in the axial plane}. That set holds only 12 distinct transforms
(flip x then k turns equals flip y then k + 2 turns), so 4 views are counted twice, and the reference
code also inverts "flip then rotate" in the wrong order (4 views come back rotated by 180 degrees).
Here a view is "flip, then rotate"; its inverse rotates back first and then flips. ``VIEWS`` holds
the 16 distinct views 4 in-plane rotations x {no flip, flip x} x {no flip, flip z}.

All transforms act on tensors whose last three dimensions are the spatial (x, y, z) axes, with the
axial plane spanned by dims -3 and -2 (nibabel's x and y).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

AXIAL_DIMS = (-3, -2)
"""The in-plane (axial) spatial dims of a (..., x, y, z) tensor."""


@dataclass(frozen=True)
class View:
    """One test-time view: flip along ``flip_dims`` (subset of (-3, -2, -1)), then ``k`` axial quarter-turns.

    Attributes:
        flip_dims: spatial dims flipped first (negative indices; -3 = x, -2 = y, -1 = z).
        k: number of 90-degree turns by ``torch.rot90`` over dims (-3, -2), applied after the flips.
    """

    flip_dims: tuple[int, ...] = ()
    k: int = 0

    def __post_init__(self) -> None:
        if not set(self.flip_dims) <= {-3, -2, -1} or len(set(self.flip_dims)) != len(self.flip_dims):
            raise ValueError(f"View flip_dims={self.flip_dims}: expected distinct dims among (-3, -2, -1)")
        if self.k not in (0, 1, 2, 3):
            raise ValueError(f"View k={self.k}: expected a quarter-turn count in 0..3")

    @property
    def name(self) -> str:
        """Readable name such as ``flip_x+z_rot90`` or ``identity``."""
        parts = []
        if self.flip_dims:
            parts.append("flip_" + "+".join("xyz"[d + 3] for d in sorted(self.flip_dims)))
        if self.k:
            parts.append(f"rot{90 * self.k}")
        return "_".join(parts) or "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the view: flip, then rotate in the axial plane."""
        if self.flip_dims:
            x = torch.flip(x, self.flip_dims)
        if self.k:
            x = torch.rot90(x, self.k, AXIAL_DIMS)
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the view exactly: rotate back first, then flip (docs/method.md, Known traps)."""
        if self.k:
            x = torch.rot90(x, -self.k, AXIAL_DIMS)
        if self.flip_dims:
            x = torch.flip(x, self.flip_dims)
        return x

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Spatial shape of a view of a volume of shape ``spatial`` (odd turns swap x and y)."""
        sx, sy, sz = spatial
        return (sy, sx, sz) if self.k % 2 else (sx, sy, sz)

    def __repr__(self) -> str:
        return f"View({self.name})"


VIEWS: tuple[View, ...] = tuple(
    View(flip_dims=tuple(d for d, on in ((-3, fx), (-1, fz)) if on), k=k)
    for fx, fz in itertools.product((False, True), repeat=2)
    for k in range(4)
)
"""The 16 distinct views of docs/method.md: {no flip, flip x} x {no flip, flip z} x 4 axial rotations."""

FLIP_VIEWS: tuple[View, ...] = tuple(
    View(flip_dims=tuple(d for d, on in zip((-3, -2, -1), mask, strict=True) if on))
    for mask in itertools.product((False, True), repeat=3)
)
"""The 8 flip combinations over the three axes, no rotation."""

PAPER_VIEWS: tuple[View, ...] = tuple(
    View(flip_dims=flips, k=k) for flips in ((), (-3,), (-2,), (-1,)) for k in range(4)
)
"""The paper's 16 views ({no flip, flip along one axis} x 4 rotations): only 12 distinct (for tests)."""

VIEW_SETS: dict[str, tuple[View, ...]] = {"none": (View(),), "flips": FLIP_VIEWS, "all": VIEWS}


def get_views(name: str) -> tuple[View, ...]:
    """Return the view set ``name``: "none" (identity), "flips" (8) or "all" (16)."""
    try:
        return VIEW_SETS[name]
    except KeyError:
        raise ValueError(f"unknown TTA view set {name!r}; expected one of {sorted(VIEW_SETS)}") from None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def iter_view_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    views: Sequence[View] = VIEWS,
    view_batch_size: int = 4,
    amp_dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each view's sigmoid probabilities, mapped back to the input's orientation.

    Views whose transformed shapes are equal are stacked into batches of ``view_batch_size`` for the network.

    Args:
        model: network mapping (B, C, X, Y, Z) to logits (B, 3, X, Y, Z); put in eval mode by the caller.
        image: (1, C, X, Y, Z) on the model's device, each spatial side a multiple of 8.
        views: the views to evaluate.
        view_batch_size: how many views go through the network at once.
        amp_dtype: autocast dtype (see :func:`resolve_amp_dtype`), or None for fp32.

    Yields:
        float32 tensors (3, X, Y, Z), one per view, in the order of ``views`` within each shape group.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"tta: expected an image of shape (1, C, X, Y, Z), got {tuple(image.shape)}")
    if view_batch_size < 1:
        raise ValueError(f"tta: view_batch_size={view_batch_size}, expected >= 1")
    spatial = tuple(image.shape[-3:])
    groups: dict[tuple[int, int, int], list[View]] = {}
    for view in views:
        groups.setdefault(view.output_shape(spatial), []).append(view)
    for group in groups.values():
        for start in range(0, len(group), view_batch_size):
            chunk = group[start:start + view_batch_size]
            # The grad/autocast modes are entered per batch and left before yielding, so that the caller's
            # code between two views never runs under them (a suspended generator would keep them on).
            with torch.inference_mode(), _autocast(image.device, amp_dtype):
                batch = torch.cat([view.forward(image) for view in chunk], dim=0)
                logits = model(batch)
                if isinstance(logits, (tuple, list)):  # deep supervision left on: main output first
                    logits = logits[0]
                probs = torch.sigmoid(logits.float())
                back = [view.inverse(probs[i]) for i, view in enumerate(chunk)]
            yield from back


def tta_predict(
    model: nn.Module,
    image: torch.Tensor,
    views: Sequence[View] = VIEWS,
    view_batch_size: int = 4,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean sigmoid probability over ``views`` (docs/method.md, Inference: TTA).

    Accumulates in float64 so the mean of identical views is exact, returns float32.

    Args:
        model: network in eval mode (logits out).
        image: (1, C, X, Y, Z), sides multiples of 8.
        views: view set (default: the 16 distinct views).
        view_batch_size: views per network call.
        amp_dtype: autocast dtype or None.

    Returns:
        Probabilities (3, X, Y, Z), float32, on the image's device.
    """
    total: torch.Tensor | None = None
    with torch.inference_mode():
        for probs in iter_view_probabilities(model, image, views, view_batch_size, amp_dtype):
            total = probs.double() if total is None else total.add_(probs)
    if total is None:
        raise ValueError("tta_predict: no views given")
    return (total / len(views)).float()
